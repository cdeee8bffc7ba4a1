"""`labkit loadtest`: load-test a /generate endpoint and print the seed's report.

Closed loop by default: `concurrency` workers, each sends its next request when its last one
returns. With `rate`, open loop: Poisson arrivals at `rate` requests/s (optionally at most
`concurrency` in flight), latency measured from each request's scheduled send time, so a slow
server cannot slow the arrivals down and hide its own queueing (coordinated omission).

Library use (a script or a Jupyter cell, where an event loop is already running):

    result = labkit.measure.loadtest.run("http://127.0.0.1:8000", concurrency=5, requests=50)
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
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import numpy as np

from labkit.measure.loadstats import DEFINITIONS, LoadTestResult, RequestRecord

DEFAULT_PROMPT = "Suggest a skincare routine for dry skin"
DEFAULT_CONCURRENCY = 5
SERVER_FIELDS = {  # record attribute <- response field
    "tokens_generated": "tokens_generated", "prompt_tokens": "prompt_tokens",
    "queue_time_ms": "queue_time_ms", "inference_time_ms": "inference_time_ms",
    "server_ttft_ms": "time_to_first_token_ms", "server_total_ms": "total_time_ms",
    "request_id": "request_id", "model": "model", "device": "device", "gpu_name": "gpu_name",
    "synthetic": "synthetic",
}


class ServerNotReady(RuntimeError):
    """A target URL cannot be reached, or its server is still loading the model."""


def normalize_urls(urls: str | Sequence[str]) -> list[str]:
    """Accept one URL, several, or comma-separated ones. A bare server address
    (http://host:port or .../) means its /generate endpoint."""
    items = [urls] if isinstance(urls, str) else list(urls)
    result = []
    for item in items:
        for url in (u.strip() for u in item.split(",")):
            if not url:
                continue
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"not an http(s) URL: {url!r}; use e.g. "
                                 "http://localhost:8000/generate")
            if parsed.path in ("", "/"):
                url = url.rstrip("/") + "/generate"
            result.append(url)
    if not result:
        raise ValueError("no URL given; use e.g. --url http://localhost:8000/generate")
    return result


def run(url: str | Sequence[str], concurrency: int | None = None, requests: int = 50, *,
        max_tokens: int = 150, prompt: str | Sequence[str] = DEFAULT_PROMPT,
        temperature: float = 0.7, timeout: float = 300.0, warmup: int = 0,
        rate: float | None = None, seed: int = 0, progress: bool = True,
        check_ready: bool = True) -> LoadTestResult:
    """Run a load test and return its result. Blocks; works inside a running event loop
    (Jupyter) by running the test on a thread of its own. See `arun` for the arguments."""
    coro = arun(url, concurrency, requests, max_tokens=max_tokens, prompt=prompt,
                temperature=temperature, timeout=timeout, warmup=warmup, rate=rate, seed=seed,
                progress=progress, check_ready=check_ready)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a plain script: no loop yet
        return asyncio.run(coro)
    return _run_on_own_thread(coro)


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
               max_tokens: int = 150, prompt: str | Sequence[str] = DEFAULT_PROMPT,
               temperature: float = 0.7, timeout: float = 300.0, warmup: int = 0,
               rate: float | None = None, seed: int = 0, progress: bool = True,
               check_ready: bool = True) -> LoadTestResult:
    """Async load test.

    url: one or several /generate URLs (list or comma-separated), used round-robin.
    concurrency: closed loop: number of workers (default 5). Open loop (`rate` set): the most
        requests in flight at once (default: no cap).
    requests: how many requests to measure; `warmup` more are sent first and not counted.
    prompt: one prompt or several (used in turn).
    rate: requests per second, Poisson arrivals (open loop); None = closed loop.
    timeout: seconds per request before it counts as a "timeout" failure.
    """
    urls = normalize_urls(url)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    _check_args(concurrency, requests, warmup, rate, timeout, prompts)
    if rate is None and concurrency is None:
        concurrency = DEFAULT_CONCURRENCY
    config = {"urls": urls, "concurrency": concurrency, "requests": requests, "rate": rate,
              "max_tokens": max_tokens, "temperature": temperature, "timeout": timeout,
              "warmup": warmup, "prompts": len(prompts), "seed": seed}
    client = _Client(urls, prompts, max_tokens, temperature)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_mark_sent)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace],
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        client.session = session
        if check_ready:
            await _check_ready(session, urls)
        if warmup:
            await client.closed_loop(range(warmup), min(concurrency or warmup, warmup), None)
        label = f"open loop {rate:g} req/s" if rate is not None else f"concurrency {concurrency}"
        with _progress_bar(requests, progress, label) as bar:
            client.reset_clock()
            if rate is None:
                records = await client.closed_loop(range(warmup, warmup + requests),
                                                   concurrency, bar)
            else:
                records = await client.open_loop(range(warmup, warmup + requests), rate,
                                                 concurrency, seed, bar)
    for record in records:
        record.index -= warmup
    return LoadTestResult(records, config)


class _Client:
    def __init__(self, urls: list[str], prompts: list[str], max_tokens: int, temperature: float):
        self.urls = urls
        # Bodies are encoded once: at a few thousand requests a second, json.dumps per request
        # is measurable client time.
        self.bodies = [json.dumps({"prompt": p, "max_tokens": max_tokens,
                                   "temperature": temperature}).encode() for p in prompts]
        self.session: aiohttp.ClientSession | None = None
        self.t0 = time.perf_counter()

    def reset_clock(self) -> None:
        self.t0 = time.perf_counter()

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

    async def open_loop(self, indices: range, rate: float, cap: int | None, seed: int,
                        bar) -> list[RequestRecord]:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(indices))
        arrivals = self.t0 + np.cumsum(gaps) - gaps[0]  # the first request leaves at once
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
                               ready_s=None if ready is None else ready - self.t0)
        body = b""
        try:
            async with self.session.post(url, data=self.bodies[i % len(self.bodies)],
                                         headers={"Content-Type": "application/json"},
                                         trace_request_ctx=marks) as response:
                record.status = response.status
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
        if record.error_type is None:
            self._read_response(record, body)
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


async def _mark_sent(session, context, params) -> None:
    if context.trace_request_ctx is not None:  # None for the readiness check
        context.trace_request_ctx["sent"] = time.perf_counter()


async def _check_ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
    """Fail early with a clear message rather than with N connection errors."""
    for base in sorted({u[: u.rfind("/")] for u in urls}):
        try:
            async with session.get(base + "/", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise ServerNotReady(
                f"Cannot reach {base}/ ({type(err).__name__}: {err}). Is the server running? "
                "Start one with `labkit serve` (or check the URL and port).") from None
        except ValueError:
            continue  # not a labkit server: nothing to check
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

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label, self.bar = total, enabled, label, None

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.label, unit="req", mininterval=0.2,
                            bar_format=self.FORMAT)
        return self.bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# --- command line -------------------------------------------------------------------------------

def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=None,
                        help="the /generate URL (or the server's base URL); repeat it or "
                             "separate with commas to spread requests round-robin")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop: concurrent workers (default 5); with --rate: the "
                             "most requests in flight (default: no cap)")
    parser.add_argument("--requests", type=int, default=50, help="requests to measure (50)")
    parser.add_argument("--max-tokens", type=int, default=150)
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
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
        print("error: --url is required, e.g. --url http://localhost:8000/generate",
              file=sys.stderr)
        return 2
    try:
        prompts = _read_prompts(args)
        result = run(args.url, args.concurrency, args.requests, max_tokens=args.max_tokens,
                     prompt=prompts, temperature=args.temperature, timeout=args.timeout,
                     warmup=args.warmup, rate=args.rate, seed=args.seed,
                     progress=not args.no_progress)
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
           "normalize_urls", "run"]
