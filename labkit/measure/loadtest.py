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

import asyncio
import concurrent.futures
import math
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import aiohttp
import numpy as np

from labkit.measure.auth import API_KEY_ENVS, api_key_from_env
from labkit.measure.load_client import (
    Client,
    ServerNotReady,
    ensure_ready,
    mark_sent,
    openai_model,
    raise_open_file_limit,
)
from labkit.measure.loadstats import DEFINITIONS, LoadTestResult, RequestRecord

DEFAULT_PROMPT = "Suggest a skincare routine for dry skin"
DEFAULT_CONCURRENCY = 5
APIS = ("generate", "openai")
API_KEY_ENV = API_KEY_ENVS[0]  # the one messages name first
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
        return _run_in_script(coro)
    return _run_on_own_thread(coro)


def _run_in_script(coro) -> LoadTestResult:
    """The test on a loop of its own. Ctrl-C cancels it, and `arun` then returns what ended:
    raised as `Interrupted`, so that it still stops the caller (a sweep, a loop of tests)."""
    result = asyncio.run(coro)
    if result.config.get("interrupted"):
        raise Interrupted(result)
    return result


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: it stops the caller as any Ctrl-C does, and `result` holds the
    requests that ended (its config's "interrupted" says how many of how many)."""

    def __init__(self, result: LoadTestResult):
        super().__init__()
        self.result = result


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
    setup = _setup(url, concurrency, requests, max_tokens, prompt, temperature, timeout, warmup,
                   rate, seed, api, model, ignore_eos)
    async with _client_session(timeout) as session:
        client = await _connect(session, setup, temperature, api, model, ignore_eos,
                                check_ready)
        await _warm_up(client, warmup, setup.concurrency, on_ready)
        lag = LoopLag()
        records = await _measure(client, setup.concurrency, warmup, requests, rate, seed,
                                 arrivals, progress, lag)
    if len(records) < requests:  # interrupted: the figures are those of what ended
        setup.config["interrupted"] = {"finished": len(records), "requested": requests}
    return _result(records, warmup, client, lag, setup.config)


class _Setup(NamedTuple):
    urls: list[str]
    prompts: list[str]
    lengths: list[int]  # each request's max_tokens, the warmup's first
    concurrency: int | None
    api_key: str | None
    config: dict  # the run's settings, in the result


def _setup(url, concurrency, requests, max_tokens, prompt, temperature, timeout, warmup, rate,
           seed, api, model, ignore_eos) -> _Setup:
    """`arun`'s arguments checked, each request's length drawn, and the result's config."""
    urls = normalize_urls(url, api)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    _check_args(concurrency, requests, warmup, rate, timeout, prompts, temperature)
    mix = parse_max_tokens(max_tokens)
    # The lengths' own random stream: the arrivals stay those of `seed` with or without a mix.
    draw = np.random.default_rng([seed, 1]) if len(mix) > 1 else None
    lengths = assign_max_tokens(mix, warmup, draw) + assign_max_tokens(mix, requests, draw)
    if api == "generate" and (model is not None or ignore_eos):
        raise ValueError("model and ignore_eos apply to api='openai' (--api openai) only")
    if rate is None and concurrency is None:
        concurrency = DEFAULT_CONCURRENCY
    raise_open_file_limit(concurrency)  # before the connections, not once they fail
    api_key = api_key_from_env()
    config = {"urls": urls, "concurrency": concurrency, "requests": requests, "rate": rate,
              "max_tokens": mix if len(mix) > 1 else next(iter(mix)),
              "temperature": temperature, "timeout": timeout,
              "warmup": warmup, "prompts": len(prompts), "seed": seed, "api": api}
    return _Setup(urls, prompts, lengths, concurrency, api_key, config)


def _client_session(timeout: float) -> aiohttp.ClientSession:
    """A session with no connection limit, marking when each request's headers went out."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(mark_sent)
    return aiohttp.ClientSession(connector=connector, trace_configs=[trace],
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def _connect(session: aiohttp.ClientSession, setup: _Setup, temperature: float, api: str,
                   model: str | None, ignore_eos: bool, check_ready: bool) -> Client:
    """The client on `session`, once the server is ready (api="openai": the model asked for,
    found, and put in the config)."""
    if api == "openai":
        model = await openai_model(session, setup.urls, model, setup.api_key, check_ready)
        setup.config.update(model=model, ignore_eos=ignore_eos,
                            api_key_from_env=bool(setup.api_key))
    elif check_ready:
        await ensure_ready(session, setup.urls)
    client = Client(setup.urls, setup.prompts, setup.lengths, temperature, api=api, model=model,
                    ignore_eos=ignore_eos, api_key=setup.api_key)
    client.session = session
    return client


async def _warm_up(client: Client, warmup: int, concurrency: int | None,
                   on_ready: Callable[[], float] | None) -> None:
    """The unmeasured requests, then `on_ready`'s start time waited for."""
    if warmup:
        await client.closed_loop(range(warmup), min(concurrency or warmup, warmup), None)
    if on_ready is not None:
        start_at = await asyncio.get_running_loop().run_in_executor(None, on_ready)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))


async def _measure(client: Client, concurrency: int | None, warmup: int, requests: int,
                   rate: float | None, seed: int, arrivals: Sequence[float] | None,
                   progress: bool | Callable[[int], None], lag: LoopLag) -> list[RequestRecord]:
    """The measured requests, closed or open loop, the client's event-loop lag watched (into
    `lag`). Cancelled (Ctrl-C), the requests that ended, unless none did."""
    if arrivals is None and rate is not None:
        arrivals = poisson_arrivals(rate, requests, seed)
    label = f"open loop {rate:g} req/s" if rate is not None else f"concurrency {concurrency}"
    watch = asyncio.create_task(lag.watch())
    try:
        with _progress_bar(requests, progress, label) as bar:
            client.reset_clock()
            if arrivals is None:
                return await client.closed_loop(range(warmup, warmup + requests),
                                                concurrency, bar)
            return await client.open_loop(range(warmup, warmup + requests), arrivals,
                                          concurrency, bar)
    except asyncio.CancelledError:
        if not client.finished:
            raise
        return list(client.finished)
    finally:
        watch.cancel()


def _result(records: list[RequestRecord], warmup: int, client: Client, lag: LoopLag,
            config: dict) -> LoadTestResult:
    """The measured records, numbered from 0, with the run's config and clock."""
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


def _check_args(concurrency, requests, warmup, rate, timeout, prompts, temperature) -> None:
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
    # NaN or inf would go out as JSON no server accepts (every request a 400), and no server
    # takes a negative temperature: refused here, once, rather than once per request.
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature >= 0)):
        raise ValueError(f"temperature must be a finite number, 0 or more, got {temperature!r}")


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


__all__ = ["DEFINITIONS", "Interrupted", "LoadTestResult", "RequestRecord", "ServerNotReady",
           "arun",
           "assign_max_tokens", "normalize_urls", "parse_max_tokens", "run"]
