"""`labkit loadtest`: load-test a server and print the seed's report.

Two APIs: the seed's `POST /generate` (default), or with `api="openai"` (`--api openai`) any
OpenAI-compatible server's streamed `POST /v1/completions` (vLLM's, or any other),
timed on the client side with `vllm bench serve`'s definitions: TTFT to the first chunk carrying
text, ITL between such chunks, TPOT from the usage chunk's token count.

Closed loop by default: `concurrency` workers, each sends its next request when its last one
returns. With `rate`, open loop: Poisson arrivals at `rate` requests/s (optionally at most
`concurrency` in flight), latency measured from each request's scheduled send time, so a slow
server cannot slow the arrivals down and hide its own queueing (coordinated omission).

Mixed lengths: `max_tokens` may be several lengths with their shares of the requests,
`"16:0.8,256:0.2"` (`--max-tokens 16:0.8,256:0.2`) or `{16: 0.8, 256: 0.2}`: each length gets
its share of the requests (rounded), in an order shuffled with `seed`, in either loop. Each
record keeps its request's max_tokens, and the report adds a line per length.

Library use (a script or a Jupyter cell, where an event loop is already running):

    result = labkit.measure.loadtest.run("http://127.0.0.1:8000", concurrency=5, requests=50)
    result = labkit.measure.loadtest.run("http://vllm:8000/v1", api="openai", requests=50)
    result = labkit.measure.loadtest.run(url, rate=4, requests=100, max_tokens="32:0.8,512:0.2")
    print(result.report()); df = result.to_dataframe()

Metric definitions: labkit.measure.loadstats.DEFINITIONS (`labkit loadtest --explain`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp
import numpy as np

from labkit.measure.auth import API_KEY_ENVS, api_key_from_env, auth_headers
from labkit.measure.loadstats import DEFINITIONS, LoadTestResult, RequestRecord

DEFAULT_PROMPT = "Suggest a skincare routine for dry skin"
DEFAULT_CONCURRENCY = 5
APIS = ("generate", "openai")
API_KEY_ENV = API_KEY_ENVS[0]  # the one messages name first
SERVER_FIELDS = {  # record attribute <- response field
    "tokens_generated": "tokens_generated", "prompt_tokens": "prompt_tokens",
    "queue_time_ms": "queue_time_ms", "inference_time_ms": "inference_time_ms",
    "server_ttft_ms": "time_to_first_token_ms", "server_total_ms": "total_time_ms",
    "request_id": "request_id", "model": "model", "device": "device", "gpu_name": "gpu_name",
    "synthetic": "synthetic",
}


class ServerNotReady(RuntimeError):
    """A target URL cannot be reached, or its server is still loading the model."""


MaxTokens = int | str | Mapping[int, float] | Sequence[int]


def parse_max_tokens(value: MaxTokens) -> dict[int, float]:
    """{length: share of the requests}, shares summing to 1, from one length (150, "150"),
    lengths with weights ("16:0.8,256:0.2", {16: 0.8, 256: 0.2}; weights need not sum to 1)
    or lengths alone ("16,256", [16, 256]: equal shares)."""
    if isinstance(value, str):
        pairs = []
        for item in (part.strip() for part in value.split(",")):
            length, _, weight = item.partition(":")
            try:
                pairs.append((int(length), float(weight) if weight else 1.0))
            except ValueError:
                raise ValueError(f"max_tokens {value!r}: expected LENGTH or LENGTH:WEIGHT items "
                                 "separated by commas, e.g. 150 or 16:0.8,256:0.2") from None
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, Sequence):
        pairs = [(length, 1.0) for length in value]
    else:
        pairs = [(value, 1.0)]
    lengths = [length for length, _ in pairs]
    if not pairs or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
                        for n in lengths):
        raise ValueError(f"max_tokens must be whole numbers of tokens, at least 1; got {value!r}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"max_tokens {value!r} names a length twice")
    weights = [float(w) for _, w in pairs]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"max_tokens {value!r}: every weight must be a positive number")
    total = sum(weights)
    return {int(length): w / total for length, w in zip(lengths, weights, strict=True)}


def assign_max_tokens(mix: Mapping[int, float], count: int,
                      rng: np.random.Generator) -> list[int]:
    """`count` lengths: each length of `mix` `share × count` times (rounded by largest
    remainder, so they add up to `count`), in an order shuffled by `rng`."""
    exact = {length: share * count for length, share in mix.items()}
    counts = {length: math.floor(x) for length, x in exact.items()}
    by_remainder = sorted(mix, key=lambda n: counts[n] - exact[n])  # largest remainder first
    for length in by_remainder[:count - sum(counts.values())]:
        counts[length] += 1
    lengths = [length for length, n in counts.items() for _ in range(n)]
    if len(mix) > 1:
        rng.shuffle(lengths)
    return lengths


def normalize_urls(urls: str | Sequence[str], api: str = "generate") -> list[str]:
    """Accept one URL, several, or comma-separated ones. A bare server address
    (http://host:port or .../) means its /generate endpoint; with api="openai", a bare address
    or one ending in /v1 means its /v1/completions. Any other path is used as it is."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    items = [urls] if isinstance(urls, str) else list(urls)
    example = "http://localhost:8000/v1" if api == "openai" else "http://localhost:8000/generate"
    result = []
    for item in items:
        for url in (u.strip() for u in item.split(",")):
            if not url:
                continue
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"not an http(s) URL: {url!r}; use e.g. {example}")
            path = parsed.path.rstrip("/")
            if api == "generate":
                if path.endswith(("/v1", "/v1/completions", "/chat/completions")):
                    raise ValueError(f"{url} is an OpenAI-style URL: add --api openai "
                                     "(api='openai')")
                if parsed.path in ("", "/"):
                    url = url.rstrip("/") + "/generate"
            else:
                if path.endswith("/chat/completions"):
                    raise ValueError(f"{url}: only the completions API (/v1/completions) is "
                                     "supported, not chat completions")
                if path.endswith("/generate"):
                    raise ValueError(f"{url} is the seed's /generate API: drop --api openai, "
                                     "or give the server's /v1 URL")
                if path == "":
                    url = url.rstrip("/") + "/v1/completions"
                elif path.endswith("/v1"):
                    url = url.rstrip("/") + "/completions"
            result.append(url)
    if not result:
        raise ValueError(f"no URL given; use e.g. --url {example}")
    return result


def run(url: str | Sequence[str], concurrency: int | None = None, requests: int = 50, *,
        max_tokens: MaxTokens = 150, prompt: str | Sequence[str] = DEFAULT_PROMPT,
        temperature: float = 0.7, timeout: float = 300.0, warmup: int = 0,
        rate: float | None = None, seed: int = 0, progress: bool = True,
        check_ready: bool = True, api: str = "generate", model: str | None = None,
        ignore_eos: bool = False, workers: int = 1) -> LoadTestResult:
    """Run a load test and return its result. Blocks; works inside a running event loop
    (Jupyter) by running the test on a thread of its own. See `arun` for the arguments;
    `workers` > 1 sends the load from that many processes (`labkit.measure.load_workers`)."""
    options = dict(max_tokens=max_tokens, prompt=prompt, temperature=temperature,
                   timeout=timeout, warmup=warmup, rate=rate, seed=seed, check_ready=check_ready,
                   api=api, model=model, ignore_eos=ignore_eos)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > 1:
        from labkit.measure import load_workers

        if concurrency is None and rate is None:
            concurrency = DEFAULT_CONCURRENCY
        arrivals = poisson_arrivals(rate, requests, seed) if rate is not None else None
        plan = {**options, "url": url, "concurrency": concurrency, "requests": requests,
                "arrivals": arrivals}
        return load_workers.run(workers, _worker_job, plan,
                                lambda: _progress_bar(requests, progress, f"{workers} workers"),
                                {"ServerNotReady": ServerNotReady})
    coro = arun(url, concurrency, requests, progress=progress, **options)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a plain script: no loop yet
        return asyncio.run(coro)
    return _run_on_own_thread(coro)


def _worker_job(plan: dict, ready: Callable[[], float], count: Callable[[int], None]):
    """One load_workers process's share of the load: (records, config)."""
    plan = dict(plan)
    url, concurrency, requests = plan.pop("url"), plan.pop("concurrency"), plan.pop("requests")
    result = asyncio.run(arun(url, concurrency, requests, progress=count, on_ready=ready,
                              **plan))
    return result.records, result.config


def _run_on_own_thread(coro) -> LoadTestResult:
    """A notebook cell already runs inside the kernel's event loop, which cannot be re-entered:
    run the test on a fresh loop on a thread of its own and wait for it here. Interrupting the
    kernel cancels the test instead of leaving it running in the background."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)

    def target() -> LoadTestResult:
        try:
            return loop.run_until_complete(task)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1, "labkit-loadtest") as pool:
        future = pool.submit(target)
        try:
            return future.result()
        except KeyboardInterrupt:
            loop.call_soon_threadsafe(task.cancel)
            concurrent.futures.wait([future])
            raise


async def arun(url: str | Sequence[str], concurrency: int | None = None, requests: int = 50, *,
               max_tokens: MaxTokens = 150, prompt: str | Sequence[str] = DEFAULT_PROMPT,
               temperature: float = 0.7, timeout: float = 300.0, warmup: int = 0,
               rate: float | None = None, seed: int = 0,
               progress: bool | Callable[[int], None] = True, check_ready: bool = True,
               api: str = "generate", model: str | None = None, ignore_eos: bool = False,
               arrivals: Sequence[float] | None = None,
               on_ready: Callable[[], float] | None = None) -> LoadTestResult:
    """Async load test.

    url: one or several URLs (list or comma-separated), used round-robin: /generate URLs, or
        with api="openai" /v1/completions URLs (a bare http://host:port or .../v1 means that).
    concurrency: closed loop: number of workers (default 5). Open loop (`rate` set): the most
        requests in flight at once (default: no cap).
    requests: how many requests to measure; `warmup` more are sent first and not counted.
    max_tokens: tokens per request, or a mix of lengths with shares ("16:0.8,256:0.2",
        {16: 0.8, 256: 0.2}): each length gets its share of the requests, shuffled with `seed`.
    prompt: one prompt or several (used in turn).
    rate: requests per second, Poisson arrivals (open loop); None = closed loop.
    seed: of the Poisson arrivals, and of the order of a mix of lengths.
    timeout: seconds per request (a stream: to its end) before it counts as a "timeout" failure.
    api: "generate" (the seed's POST /generate) or "openai" (streamed POST /v1/completions).
    model: api="openai": the model to ask for; None asks the server's GET /v1/models and takes
        the one model it serves. The API key, if any, comes from $OPENAI_API_KEY (else
        $LABKIT_API_KEY), for either api.
    ignore_eos: api="openai": send vLLM's "ignore_eos": true, so every request generates
        exactly max_tokens tokens (fixed-length benchmarks).
    progress: a progress bar; or a function called with 1 as each request ends.
    arrivals: open loop at these send times (seconds from the start, one per request) instead
        of Poisson arrivals at `rate`.
    on_ready: called (off the loop) once warmed up; returns the `time.perf_counter()` at which
        to start (several processes start together: `labkit.measure.load_workers`).

    The client's own event-loop lag is watched throughout (`client_loop_lag_ms` in the
    summary): a loop that lags delays every send and every chunk it times.
    """
    urls = normalize_urls(url, api)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    _check_args(concurrency, requests, warmup, rate, timeout, prompts)
    mix = parse_max_tokens(max_tokens)
    # The lengths' own random stream: the arrivals stay those of `seed` with or without a mix.
    draw = np.random.default_rng([seed, 1]) if len(mix) > 1 else None
    lengths = assign_max_tokens(mix, warmup, draw) + assign_max_tokens(mix, requests, draw)
    if api == "generate" and (model is not None or ignore_eos):
        raise ValueError("model and ignore_eos apply to api='openai' (--api openai) only")
    if rate is None and concurrency is None:
        concurrency = DEFAULT_CONCURRENCY
    api_key = api_key_from_env()
    config = {"urls": urls, "concurrency": concurrency, "requests": requests, "rate": rate,
              "max_tokens": mix if len(mix) > 1 else next(iter(mix)),
              "temperature": temperature, "timeout": timeout,
              "warmup": warmup, "prompts": len(prompts), "seed": seed, "api": api}
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_mark_sent)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace],
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        if api == "openai":
            model = await _openai_model(session, urls, model, api_key, check_ready)
            config.update(model=model, ignore_eos=ignore_eos, api_key_from_env=bool(api_key))
        elif check_ready:
            await _check_ready(session, urls)
        client = _Client(urls, prompts, lengths, temperature, api=api, model=model,
                         ignore_eos=ignore_eos, api_key=api_key)
        client.session = session
        if warmup:
            await client.closed_loop(range(warmup), min(concurrency or warmup, warmup), None)
        if on_ready is not None:
            start_at = await asyncio.get_running_loop().run_in_executor(None, on_ready)
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        if arrivals is None and rate is not None:
            arrivals = poisson_arrivals(rate, requests, seed)
        label = f"open loop {rate:g} req/s" if rate is not None else f"concurrency {concurrency}"
        lag = LoopLag()
        watch = asyncio.create_task(lag.watch())
        with _progress_bar(requests, progress, label) as bar:
            client.reset_clock()
            if arrivals is None:
                records = await client.closed_loop(range(warmup, warmup + requests),
                                                   concurrency, bar)
            else:
                records = await client.open_loop(range(warmup, warmup + requests), arrivals,
                                                 concurrency, bar)
        watch.cancel()
    for record in records:
        record.index -= warmup
    # perf_counter is the system's monotonic clock: another process on this machine can place
    # the records' relative times on its own timeline (labkit.measure.utilization.loadtest_t0).
    config["t0_perf_counter"] = client.t0
    config["client_loop_lag_ms"] = lag.samples_ms
    return LoadTestResult(records, config)


def poisson_arrivals(rate: float, count: int, seed: int) -> np.ndarray:
    """Send times of `count` Poisson arrivals at `rate` per second (seconds from the start;
    the first at 0)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    return np.cumsum(gaps) - gaps[0]


class LoopLag:
    """How late this event loop wakes from a short sleep: the delay it adds to every send and
    every chunk it times. Near 0 while the client keeps up; milliseconds when it is saturated."""

    INTERVAL_S = 0.01

    def __init__(self):
        self.samples_ms: list[float] = []

    async def watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.INTERVAL_S)
            late = time.perf_counter() - before - self.INTERVAL_S
            self.samples_ms.append(round(max(0.0, late) * 1000, 3))


class _Client:
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

    def reset_clock(self) -> None:
        self.t0 = time.perf_counter()

    def max_tokens(self, i: int) -> int:
        return self.lengths[i if len(self.lengths) > 1 else 0]

    def body(self, i: int) -> bytes:
        """Request i's encoded body: prompts in turn, its own max_tokens."""
        return self.bodies[i % self.prompts, self.max_tokens(i)]

    async def closed_loop(self, indices: range, concurrency: int, bar) -> list[RequestRecord]:
        records: list[RequestRecord] = []
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
        records: list[RequestRecord] = []

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
        usage = problem = error = None
        finished = seen_data = False
        head = b""  # the start of the body, to show when it is not an event stream
        pending = b""
        content = response.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    break
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
                        if event.get("usage"):
                            usage = event["usage"]
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
            record.error_type = "incomplete stream"
            record.error = (f"the stream broke off after {_chunks(chunks)}, before data: "
                            f"[DONE] ({type(err).__name__}: {err})")
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
            record.tokens_from_usage = isinstance(tokens, int)
            record.tokens_generated = tokens if record.tokens_from_usage else chunks
            if record.tokens_from_usage:
                record.prompt_tokens = usage.get("prompt_tokens")


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


async def _mark_sent(session, context, params) -> None:
    if context.trace_request_ctx is not None:  # None for the readiness check
        context.trace_request_ctx["sent"] = time.perf_counter()


async def _openai_model(session: aiohttp.ClientSession, urls: list[str], model: str | None,
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


async def _check_ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
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


def _check_args(concurrency, requests, warmup, rate, timeout, prompts) -> None:
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be non-empty strings")


class _progress_bar:
    """tqdm.auto: a text bar in a terminal, a widget in a notebook; nothing when disabled.
    Labelled with the load (several bars in one notebook say which is which), and always in
    requests per second: tqdm's default flips to seconds per request below 1 req/s."""

    FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} req "
              "[{elapsed}<{remaining}, {rate_noinv_fmt}]")

    def __init__(self, total: int, enabled: bool | Callable[[int], None], label: str):
        self.total, self.enabled, self.label, self.bar = total, enabled, label, None

    def __enter__(self):
        if callable(self.enabled):  # someone else counts (load_workers' parent process)
            return _Counter(self.enabled)
        if self.enabled:
            from tqdm.auto import tqdm

            # smoothing=0: the rate shown is the mean since the first send, the report's
            # req/s, not a moving average of the last updates (which ends on the burst of the
            # last completions)
            self.bar = tqdm(total=self.total, desc=self.label, unit="req", mininterval=0.2,
                            smoothing=0, bar_format=self.FORMAT)
        return self.bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


class _Counter:
    def __init__(self, update: Callable[[int], None]):
        self.update = update


# --- command line -------------------------------------------------------------------------------

def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=None,
                        help="the /generate URL (or the server's base URL; with --api openai: "
                             "its /v1/completions, /v1 or base URL); repeat it or separate with "
                             "commas to spread requests round-robin")
    parser.add_argument("--api", choices=APIS, default="generate",
                        help="generate: the seed's POST /generate (default); openai: any "
                             "OpenAI-compatible server's POST /v1/completions, streamed and "
                             f"timed on the client (API key from ${API_KEY_ENVS[0]} or "
                             f"${API_KEY_ENVS[1]}, if set)")
    parser.add_argument("--model", default=None,
                        help="--api openai: the model to ask for (default: the one model the "
                             "server lists at GET /v1/models)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="--api openai: send vLLM's ignore_eos, so every request generates "
                             "exactly --max-tokens tokens")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop: concurrent workers (default 5); with --rate: the "
                             "most requests in flight (default: no cap)")
    parser.add_argument("--requests", type=int, default=50, help="requests to measure (50)")
    parser.add_argument("--workers", type=int, default=1,
                        help="send the load from this many processes (default 1): for loads "
                             "that one process cannot read fast enough (the report's event-loop "
                             "lag says when)")
    parser.add_argument("--max-tokens", type=_max_tokens_arg, default=150, metavar="N|MIX",
                        help="tokens per request (150); or a mix of lengths with their shares, "
                             "e.g. 16:0.8,256:0.2 (80 %% of the requests ask for 16 tokens, "
                             "20 %% for 256, in an order shuffled with --seed)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    source.add_argument("--prompts-file", type=Path, default=None,
                        help="a text file with one prompt per line, used in turn")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per request before it counts as a timeout (300)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent first and not counted (default 0)")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at this many requests/s")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Poisson arrivals and of the order of a --max-tokens mix")
    parser.add_argument("--json", type=Path, default=None, help="write summary + records here")
    parser.add_argument("--csv", type=Path, default=None, help="write one row per request here")
    parser.add_argument("--explain", action="store_true",
                        help="print the metric definitions (alone, or after the report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    """Exit status: 0 when every request succeeded, 1 when some failed, 2 on bad arguments or
    an unreachable server."""
    if args.url is None:
        if args.explain:
            print(DEFINITIONS)
            return 0
        example = ("http://localhost:8000/v1" if args.api == "openai"
                   else "http://localhost:8000/generate")
        print(f"error: --url is required, e.g. --url {example}", file=sys.stderr)
        return 2
    try:
        prompts = _read_prompts(args)
        result = run(args.url, args.concurrency, args.requests, max_tokens=args.max_tokens,
                     prompt=prompts, temperature=args.temperature, timeout=args.timeout,
                     warmup=args.warmup, rate=args.rate, seed=args.seed,
                     progress=not args.no_progress, api=args.api, model=args.model,
                     ignore_eos=args.ignore_eos, workers=args.workers)
    except (ValueError, OSError, ServerNotReady) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report(explain=args.explain))
    if args.json:
        document = {"summary": result.summary(),
                    "records": [r.as_dict() for r in result.records]}
        args.json.write_text(json.dumps(_finite(document), indent=2))
        print(f"wrote {args.json}")
    if args.csv:
        result.to_dataframe().to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0 if result.summary()["failed"] == 0 else 1


def _max_tokens_arg(text: str) -> int | dict[int, float]:
    try:
        mix = parse_max_tokens(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return mix if len(mix) > 1 else next(iter(mix))


def _read_prompts(args) -> list[str]:
    if args.prompts_file is None:
        return [args.prompt or DEFAULT_PROMPT]
    lines = [line.strip() for line in args.prompts_file.read_text().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{args.prompts_file} has no prompts (one per line)")
    return prompts


def _finite(value):
    """NaN/inf -> None, so the JSON file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


__all__ = ["DEFINITIONS", "LoadTestResult", "RequestRecord", "ServerNotReady", "arun",
           "assign_max_tokens", "normalize_urls", "parse_max_tokens", "run"]
