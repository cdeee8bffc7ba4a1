"""One load test's HTTP side: a request sent, its answer read and timed into a `RequestRecord`,
for the seed's `/generate` (one JSON answer) or an OpenAI-compatible server's streamed
`/v1/completions` (Server-Sent Events, each chunk timed as it arrives); and the checks made
before a load starts (the server is up, the model it serves). `labkit.measure.loadtest` drives
it."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence

import aiohttp
import numpy as np

from labkit.measure.auth import API_KEY_ENVS, auth_headers
from labkit.measure.loadstats import RequestRecord

API_KEY_ENV = API_KEY_ENVS[0]  # the one messages name first
SERVER_FIELDS = {  # record attribute <- response field
    "tokens_generated": "tokens_generated", "prompt_tokens": "prompt_tokens",
    "queue_time_ms": "queue_time_ms", "inference_time_ms": "inference_time_ms",
    "server_ttft_ms": "time_to_first_token_ms", "server_total_ms": "total_time_ms",
    "request_id": "request_id", "model": "model", "device": "device", "gpu_name": "gpu_name",
    "synthetic": "synthetic",
}
# Fields the report adds up: a string or null there would end the report in a TypeError, so an
# answer whose field is not a number counts as a failed request instead.
COUNT_FIELDS = ("tokens_generated", "prompt_tokens")
TIME_FIELDS = ("queue_time_ms", "inference_time_ms", "time_to_first_token_ms", "total_time_ms")


# Words that are one token each to the embedded model's tokenizer and to GPT- and Llama-style
# BPE vocabularies (with their leading space): a shared prefix of N of them is about N tokens.
PREFIX_WORDS = ("the skin care routine for dry oily and sensitive types should start with a "
                "gentle cleanser then apply serum moisturizer sunscreen every morning night "
                "water oil acid vitamin barrier daily use light cream face").split()


def shared_prefix(tokens: int) -> str:
    """A system prompt of about `tokens` tokens, the same text every time (`labkit loadtest
    --shared-prefix`): sentences of 11 words (and a full stop) drawn from PREFIX_WORDS by a
    fixed seed, so that a prefix cache has something to share between requests."""
    rng = np.random.default_rng(tokens)
    words, count = [], 0
    while count < tokens:
        sentence = list(rng.choice(PREFIX_WORDS, size=min(11, max(1, tokens - count - 1))))
        words.append(" ".join(sentence) + ".")
        count += len(sentence) + 1
    return " ".join(words)


# Files a load-test process holds besides its connections: stdio, the event loop, DNS, logs.
FD_HEADROOM = 32
_fd_limit_warned = False


def raise_open_file_limit(connections: int | None) -> int | None:
    """Each connection is an open file: at the soft limit (`ulimit -n`, 256 on macOS, often 1024
    on Linux) the next one fails as a "connection error", as if the server had refused it.
    Raise this process's soft limit to its hard limit (or, where that is refused, to what
    `connections` need), and warn once on stderr when `connections` (None: unknown, open loop
    without a cap) still will not fit. Returns the soft limit; None where there is none
    (no POSIX `resource` module)."""
    global _fd_limit_warned
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = (connections or 0) + FD_HEADROOM
    # macOS and Linux refuse an unlimited soft limit for files: then try what is needed
    for target in (hard, min(needed, hard)):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
            break
        except (ValueError, OSError):
            continue
    if connections and needed > soft and not _fd_limit_warned:
        _fd_limit_warned = True
        print(f"warning: this client may open only {soft} files (ulimit -n, hard limit {hard})"
              f" and a concurrency of {connections} needs about {needed}: requests past the "
              "limit will fail as \"connection error\" because of the client, not the server. "
              f"Raise it in the shell that runs the load test (ulimit -n {needed}; above the "
              "hard limit as root or in /etc/security/limits.conf), or use --workers N.",
              file=sys.stderr, flush=True)
    return soft


class ServerNotReady(RuntimeError):
    """A target URL cannot be reached, or its server is still loading the model."""



class Client:
    def __init__(self, urls: list[str], prompts: list[str], max_tokens: int | Sequence[int],
                 temperature: float, *, api: str = "generate", model: str | None = None,
                 ignore_eos: bool = False, api_key: str | None = None):
        """`max_tokens`: one length for every request, or request i's length at index i."""
        self.urls = urls
        self.stream = api == "openai"
        self.prompts = len(prompts)
        self.lengths = [max_tokens] if isinstance(max_tokens, int) else list(max_tokens)
        # Bodies are encoded once, per (prompt, length): at a few thousand requests a second,
        # json.dumps per request is measurable client time.
        extra = {"ignore_eos": True} if ignore_eos else {}
        self.bodies: dict[tuple[int, int], bytes] = {}
        for length in set(self.lengths):
            for k, p in enumerate(prompts):
                body = ({"model": model, "prompt": p, "max_tokens": length,
                         "temperature": temperature, "stream": True,
                         "stream_options": {"include_usage": True}, **extra} if self.stream
                        else {"prompt": p, "max_tokens": length, "temperature": temperature})
                self.bodies[k, length] = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json", **auth_headers(api_key)}
        self.api_key = api_key
        self.session: aiohttp.ClientSession | None = None
        self.t0 = time.perf_counter()
        self.finished: list[RequestRecord] = []  # the measured requests that have ended

    def reset_clock(self) -> None:
        self.t0 = time.perf_counter()

    def max_tokens(self, i: int) -> int:
        return self.lengths[i if len(self.lengths) > 1 else 0]

    def body(self, i: int) -> bytes:
        """Request i's encoded body: prompts in turn, its own max_tokens."""
        return self.bodies[i % self.prompts, self.max_tokens(i)]

    async def closed_loop(self, indices: range, concurrency: int, bar) -> list[RequestRecord]:
        records = self.finished = []  # kept on the client: an interrupted run reports them
        counter = iter(indices)

        async def worker() -> None:
            for i in counter:  # shared iterator: each index goes to exactly one worker
                records.append(await self.send(i, time.perf_counter()))
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(indices)))))
        return records

    async def open_loop(self, indices: range, send_times: Sequence[float], cap: int | None,
                        bar) -> list[RequestRecord]:
        """Request i at send_times[i] (seconds from the start), whatever the server does."""
        arrivals = self.t0 + np.asarray(send_times, dtype=float)
        slots = asyncio.Semaphore(cap) if cap else None
        records = self.finished = []

        async def one(i: int, scheduled: float) -> None:
            if slots is None:
                records.append(await self.send(i, scheduled))
            else:
                async with slots:
                    # Latency still counts from `scheduled`; the send lag from when a slot freed
                    # up, since waiting for a slot is the cap's doing, not the client's.
                    ready = max(scheduled, time.perf_counter())
                    records.append(await self.send(i, scheduled, ready))
            if bar is not None:
                bar.update(1)

        tasks = []
        for i, scheduled in zip(indices, arrivals, strict=True):
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, float(scheduled))))
        await asyncio.gather(*tasks)
        return records

    async def send(self, i: int, scheduled: float, ready: float | None = None) -> RequestRecord:
        """Send request `i`; latency from `scheduled`, send lag from `ready` (default: the same)."""
        url = self.urls[i % len(self.urls)]
        marks: dict = {}
        record = RequestRecord(index=i, url=url, scheduled_s=scheduled - self.t0, sent_s=None,
                               done_s=0.0, latency_ms=0.0, status=None, ok=False,
                               ready_s=None if ready is None else ready - self.t0,
                               max_tokens=self.max_tokens(i))
        body = b""
        try:
            async with self.session.post(url, data=self.body(i),
                                         headers=self.headers,
                                         trace_request_ctx=marks) as response:
                record.status = response.status
                if self.stream and response.status == 200:
                    body = None
                    await self._read_stream(response, record, scheduled)
                else:
                    body = await response.read()
        except asyncio.TimeoutError:
            record.error_type = "timeout"
            record.error = f"no complete response within {self.session.timeout.total} s"
        except aiohttp.ClientConnectionError as err:
            record.error_type, record.error = "connection error", f"{type(err).__name__}: {err}"
        except aiohttp.ClientError as err:
            record.error_type, record.error = "client error", f"{type(err).__name__}: {err}"
        done = time.perf_counter()
        record.done_s = done - self.t0
        record.latency_ms = (done - scheduled) * 1000
        if "sent" in marks:
            record.sent_s = marks["sent"] - self.t0
        if record.error_type is None and body is not None:
            if self.stream:
                self._read_error_response(record, body)
            else:
                self._read_response(record, body)
        if record.error and self.api_key:
            record.error = record.error.replace(self.api_key, "***")  # servers may echo it
        return record

    @staticmethod
    def _read_response(record: RequestRecord, body: bytes) -> None:
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if record.status != 200:
            record.error_type = f"HTTP {record.status}"
            record.error = (data.get("error") if isinstance(data, dict) else None) or \
                body[:200].decode(errors="replace")
        elif not isinstance(data, dict):
            record.error_type = "invalid response"
            record.error = f"not a JSON object: {body[:100]!r}"
        elif (problem := _generate_problem(data)) is not None:
            record.error_type, record.error = "invalid response", problem
        else:
            record.ok = True
            for attribute, name in SERVER_FIELDS.items():
                setattr(record, attribute, data.get(name))

    @staticmethod
    def _read_error_response(record: RequestRecord, body: bytes) -> None:
        """A /v1/completions answer other than 200: its status, and the message of an error
        body in OpenAI's shape ({"error": {"message", "type", ...}}) when there is one."""
        record.error_type = f"HTTP {record.status}"
        record.error = _openai_error(_json_or_none(body)) or body[:200].decode(errors="replace")

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord,
                           scheduled: float) -> None:
        """Read a 200 /v1/completions stream of server-sent events to its end, timing each chunk
        as its bytes arrive. Fills the record's client-side timings, tokens and outcome."""
        first = last = None  # perf_counter of the first and the latest chunk carrying text
        gaps: list[float] = []
        chunks = 0
        usage = problem = error = broken = None
        finished = seen_data = False
        head = pending = b""  # head: the start of the body, to show when it is not an event stream
        content = response.content
        try:
            while data := await content.readany():
                now = time.perf_counter()
                if not seen_data and len(head) < 300:
                    head += data
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if line[:5] != b"data:" or finished:
                        continue
                    seen_data = True
                    payload = line[5:].strip()
                    if first is not None and _plain_text_chunk(payload):
                        text = True  # the common case, without parsing it
                    elif payload == b"[DONE]":
                        finished = True
                        continue
                    else:
                        event = _json_or_none(payload)
                        try:
                            text = event["choices"][0]["text"] if event.get("choices") else None
                        except (TypeError, AttributeError, LookupError):
                            problem = problem or f"not a completion chunk: {payload[:100]!r}"
                            continue
                        usage = event.get("usage") or usage
                        if record.model is None:
                            record.model = event.get("model")
                        if error is None and ("error" in event or event.get("object") == "error"):
                            error = _error_detail(event)
                    if text:
                        chunks += 1
                        if first is None:
                            first = now
                        else:
                            gaps.append((now - last) * 1000)
                        last = now
        except aiohttp.ClientPayloadError as err:  # the connection broke off mid-stream
            broken = err
        _stream_outcome(record, scheduled, first, gaps, chunks, broken, error, seen_data, head,
                        problem, finished, usage)


def _stream_outcome(record: RequestRecord, scheduled: float, first: float | None,
                    gaps: list[float], chunks: int, broken: Exception | None, error: dict | None,
                    seen_data: bool, head: bytes, problem: str | None, finished: bool,
                    usage) -> None:
    """A read stream's record: its client-side timings, then its outcome (the first problem
    seen, else ok with its tokens)."""
    if broken is not None:
        record.error_type = "incomplete stream"
        record.error = (f"the stream broke off after {_chunks(chunks)}, before data: "
                        f"[DONE] ({type(broken).__name__}: {broken})")
    record.chunks = chunks
    record.itl_ms = gaps
    if first is not None:
        record.client_ttft_ms = (first - scheduled) * 1000
    if record.error_type is not None:
        return
    if error is not None:  # vLLM: an error after the headers went out is an event
        kind = error.get("type") or error.get("code")
        record.error_type = "error in stream" + (f": {kind}" if kind else "")
        record.error = str(error.get("message") or json.dumps(error)[:200])
    elif not seen_data:
        record.error_type = "invalid response"
        record.error = (_openai_error(_json_or_none(head)) or
                        f"not an event stream (is this an OpenAI-compatible /v1/completions?)"
                        f": {head[:100]!r}")
    elif problem:
        record.error_type, record.error = "invalid response", problem
    elif not finished:
        record.error_type = "incomplete stream"
        record.error = f"the stream ended after {_chunks(chunks)} without data: [DONE]"
    else:
        record.ok = True
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        record.tokens_from_usage = _is_count(tokens)
        record.tokens_generated = tokens if record.tokens_from_usage else chunks
        if record.tokens_from_usage and _is_count(usage.get("prompt_tokens")):
            record.prompt_tokens = usage["prompt_tokens"]

def _generate_problem(data: dict) -> str | None:
    """Why a 200 /generate answer cannot count as a success (it lacks tokens_generated, which
    the contract requires, or a field the report adds up is not a number); None when it can."""
    if "tokens_generated" not in data:
        said = _openai_error(data)  # a server that answers 200 with {"error": ...}
        return "no tokens_generated in the answer" + (
            f" ({said})" if said else f": {json.dumps(data)[:100]}")
    for name in (*COUNT_FIELDS, *TIME_FIELDS):
        value = data.get(name)
        if value is None and name != "tokens_generated":
            continue  # an optional field this server leaves out
        if name in COUNT_FIELDS and not _is_count(value):
            return f"{name} is not a whole number of tokens: {value!r:.50}"
        if not _is_number(value):
            return f"{name} is not a number: {value!r:.50}"
    return None


def _is_count(value) -> bool:
    """A token count: an int of 0 or more (a bool is an int to Python, not to JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    """A finite int or float (JSON's NaN and Infinity parse as floats; a huge int overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _plain_text_chunk(payload: bytes) -> bool:
    """Whether an event is a chunk carrying text and nothing else to read (no usage, no error),
    known without parsing it when its JSON is compact (vLLM's, labkit's): quotes inside JSON
    strings are escaped, so these keys cannot come from the text itself. Otherwise it is
    parsed. ("usage":null is what OpenAI's API and labkit put in every chunk but the last.)"""
    return (b'"text":"' in payload and b'"text":""' not in payload
            and (b'"usage"' not in payload or b'"usage":null' in payload)
            and b'"error"' not in payload)


def _chunks(count: int) -> str:
    return f"{count} chunk{'' if count == 1 else 's'} with text"


def _json_or_none(body: bytes):
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _error_detail(data) -> dict | None:
    """The error object of an error in OpenAI's shape ({"error": {...}}; vLLM's older flat
    {"object": "error", ...}; a plain {"error": "text"}); None when `data` is no error."""
    if not isinstance(data, dict):
        return None
    detail = data.get("error")
    if isinstance(detail, dict):
        return detail
    if isinstance(detail, str):
        return {"message": detail}
    return data if data.get("object") == "error" else None


def _openai_error(data) -> str | None:
    """'type: message' of an error in OpenAI's shape; None for anything else."""
    detail = _error_detail(data)
    if detail is None:
        return None
    message = str(detail.get("message") or json.dumps(detail)[:200])
    kind = detail.get("type") or detail.get("code")
    return f"{kind}: {message}" if kind else message


async def mark_sent(session, context, params) -> None:
    if context.trace_request_ctx is not None:  # None for the readiness check
        context.trace_request_ctx["sent"] = time.perf_counter()


async def openai_model(session: aiohttp.ClientSession, urls: list[str], model: str | None,
                        api_key: str | None, check_ready: bool) -> str:
    """The model to ask for. Given: checked against what each server lists at GET /v1/models,
    when it lists them (`check_ready`). None: the one model every server lists there."""
    if model is not None and not check_ready:
        return model
    listings = {}
    for models_url in sorted({u[: u.rfind("/")] + "/models" for u in urls}):
        try:
            async with session.get(models_url, headers=auth_headers(api_key),
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise ServerNotReady(
                f"Cannot reach {models_url} ({type(err).__name__}: {err}). Is the server "
                "running? (Check the URL and port.)") from None
        data = _json_or_none(body)
        entries = data.get("data") if isinstance(data, dict) and status == 200 else None
        ids = ([str(m.get("id")) for m in entries if isinstance(m, dict) and m.get("id")]
               if isinstance(entries, list) else None)
        listings[models_url] = ids
        if status in (401, 403):
            reason = _openai_error(data) or f"HTTP {status}"
            if api_key:
                reason = reason.replace(api_key, "***")
            key = (f"check ${API_KEY_ENV}" if api_key else
                   f"set ${API_KEY_ENV} to the server's API key")
            raise ValueError(f"{models_url} refused the request (HTTP {status}: {reason}); {key}")
        if model is not None and ids and model not in ids:
            raise ValueError(f"{models_url} does not serve model {model!r}; it serves: "
                             f"{', '.join(ids)}")
        if model is None and not ids:
            said = f"HTTP {status}" if status != 200 else "no models in its list"
            raise ValueError(f"--model is required (model= in Python): {models_url} did not list "
                             f"the served models ({said})")
        if model is None and len(ids) > 1:
            raise ValueError(f"{models_url} serves several models: {', '.join(ids)}. Choose one "
                             "with --model NAME (model= in Python)")
    if model is not None:
        return model
    found = {ids[0] for ids in listings.values()}
    if len(found) > 1:
        raise ValueError("the servers serve different models ("
                         + ", ".join(f"{url}: {ids[0]}" for url, ids in listings.items())
                         + "); choose one with --model NAME (model= in Python)")
    return found.pop()


async def ensure_ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
    """Fail early with a clear message rather than with N connection errors."""
    for base in sorted({u[: u.rfind("/")] for u in urls}):
        try:
            async with session.get(base + "/", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                data = await resp.json(content_type=None) if resp.status in (200, 503) else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise ServerNotReady(
                f"Cannot reach {base}/ ({type(err).__name__}: {err}). Is the server running? "
                "Start one with `labkit serve` (or check the URL and port).") from None
        except ValueError:
            continue  # not a labkit server: nothing to check
        if isinstance(data, dict) and data.get("error"):  # a labkit server whose engine failed
            raise ServerNotReady(f"{base} cannot generate: {data['error']}")
        if isinstance(data, dict) and data.get("model_loaded") is False:
            raise ServerNotReady(
                f"{base} is still loading its model. Wait until `curl {base}/` shows "
                '"model_loaded": true, then run the load test.')


