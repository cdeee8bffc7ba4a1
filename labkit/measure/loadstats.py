"""Load-test results: per-request records, the metrics computed from them, the seed's report.

Metric definitions: DEFINITIONS below (`labkit loadtest --explain` prints them) and
ARCHITECTURE.md, "Metric definitions".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

DEFINITIONS = """\
Metric definitions
  latency      client side: from sending the request (open loop: from its scheduled send time)
               to receiving the whole response (OpenAI API: the stream's data: [DONE]),
               time.perf_counter. Failed requests are counted, reported by type, and kept out
               of every latency figure below (TTFT, ITL and TPOT included).
  percentiles  linear interpolation between the two nearest samples (numpy's default).
  throughput   successful requests / wall time from the first send to the last completion.
  tokens/s     output tokens of successful requests / that same wall time. /generate: the
               server's tokens_generated. OpenAI API: completion_tokens of the stream's final
               usage chunk; a server that sends no usage gets its text chunks counted instead,
               and the report says so.
  queue time   the server's queue_time_ms: how long a request waited in the server before its
               generation started (with one generation at a time, the others wait).
  TTFT         send (open loop: its scheduled send time) -> first token. The report says which:
               "client-side, first streamed token" (OpenAI API): when the first streamed chunk
               carrying text arrived; role-only and empty chunks do not count (vllm bench
               serve's definition). "derived from the server's fields" (/generate): the server
               answers only when the text is complete, so it is latency - (inference_time_ms -
               time_to_first_token_ms): the client's latency minus the part of generation that
               came after the first token.
  ITL          OpenAI API: the gaps between successive chunks carrying text, client side,
               pooled over all successful requests (vLLM's inter-token latency; a chunk that
               carries several tokens counts once).
  TPOT         (latency - TTFT) / (output tokens - 1), per request with 2 or more tokens (vLLM's
               definition). /generate: the same as the server's decode time per token.
  chunks       OpenAI API: the streamed chunks carrying text, over all successful requests.
  send lag     how late the client itself sent a request: from the moment it was due (closed
               loop: its worker was free; open loop: its scheduled arrival, or when a
               concurrency slot freed up) to its headers being written to the socket. A large
               send lag means the client, not the server, limits the measurement.
  loop lag     how late the client's event loop woke from a 10 ms sleep, sampled throughout:
               every send and every chunk's arrival time is that late too. Near 0 while the
               client keeps up; with --workers N, over all N processes.
"""

TTFT_SOURCES = {"openai": "client-side, first streamed token",
                "generate": "derived from the server's fields"}

# Warn when the client's own lag (p99) exceeds both of these: it then distorts the latencies.
CLIENT_LAG_WARN_MS = 10.0
CLIENT_LAG_WARN_SHARE = 0.1  # of the median latency
# ... and when its event loop wakes late by more than this (p99; streamed: or a quarter of ITL).
CLIENT_LOOP_LAG_WARN_MS = 5.0


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Times in seconds are relative to the test's start."""

    index: int
    url: str
    scheduled_s: float  # when it was meant to leave: latency counts from here
    sent_s: float | None  # headers written to the socket; None if it never got that far
    done_s: float  # response fully read, or the error raised
    latency_ms: float
    status: int | None  # HTTP status, None when no response came (timeout, connection)
    ok: bool
    error_type: str | None = None  # "HTTP 503", "timeout", "connection error", ...
    # When it could leave: `scheduled_s`, or later when it waited for a free concurrency slot
    # (open loop with a cap). The send lag counts from here.
    ready_s: float | None = None
    error: str | None = None
    max_tokens: int | None = None  # what the request asked for (a mix draws it per request)
    tokens_generated: int | None = None
    prompt_tokens: int | None = None
    queue_time_ms: float | None = None
    inference_time_ms: float | None = None
    server_ttft_ms: float | None = None  # the server's time_to_first_token_ms (from gen. start)
    server_total_ms: float | None = None
    request_id: str | None = None
    model: str | None = None
    device: str | None = None
    gpu_name: str | None = None
    synthetic: bool | None = None
    # OpenAI API (streamed), measured by the client; None for /generate.
    client_ttft_ms: float | None = None  # send -> first chunk carrying text
    itl_ms: list[float] | None = None  # gaps between successive chunks carrying text
    chunks: int | None = None  # chunks carrying text
    tokens_from_usage: bool | None = None  # tokens_generated: usage (True) or chunks (False)

    @property
    def send_lag_ms(self) -> float | None:
        if self.sent_s is None:
            return None
        ready = self.scheduled_s if self.ready_s is None else self.ready_s
        return (self.sent_s - ready) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """Send -> first token (see DEFINITIONS): measured by the client when streamed, else
        derived from the server's fields."""
        if not self.ok:
            return None
        if self.client_ttft_ms is not None:
            return self.client_ttft_ms
        if self.inference_time_ms is None or self.server_ttft_ms is None:
            return None
        return self.latency_ms - (self.inference_time_ms - self.server_ttft_ms)

    @property
    def tpot_ms(self) -> float | None:
        ttft = self.ttft_ms
        if ttft is None or not self.tokens_generated or self.tokens_generated < 2:
            return None
        return (self.latency_ms - ttft) / (self.tokens_generated - 1)

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        if self.itl_ms is not None:  # microseconds are plenty, and keep the JSON file small
            row["itl_ms"] = [round(gap, 3) for gap in self.itl_ms]
        row.update(send_lag_ms=self.send_lag_ms, ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms)
        return row


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float]:
    """{'p50': ..., ...} with linear interpolation; NaN when there are no values."""
    if len(values) == 0:
        return {f"p{q}": math.nan for q in qs}
    found = np.percentile(np.asarray(values, dtype=float), qs)  # method="linear" (default)
    return {f"p{q}": float(v) for q, v in zip(qs, found, strict=True)}


def finite(value):
    """NaN/inf -> None, so a JSON file of figures is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


class LoadTestResult:
    """What `labkit.measure.loadtest.run` returns: records, summary(), report(), to_dataframe()."""

    def __init__(self, records: list[RequestRecord], config: dict):
        self.records = sorted(records, key=lambda r: r.index)
        self.config = config

    @classmethod
    def from_document(cls, document: dict) -> LoadTestResult:
        """The result `labkit loadtest --json FILE` wrote (its summary's config, its records)."""
        names = {f.name for f in dataclasses.fields(RequestRecord)}
        records = [RequestRecord(**{k: v for k, v in row.items() if k in names})
                   for row in document["records"]]
        return cls(records, document["summary"]["config"])

    @property
    def ok_records(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    def summary(self) -> dict:
        """Every figure of the report, as plain JSON-friendly numbers."""
        ok = self.ok_records
        latencies = [r.latency_ms for r in ok]
        wall = self.wall_time_s()
        tokens = sum(r.tokens_generated or 0 for r in ok)
        lat = {"min": min(latencies, default=math.nan), "max": max(latencies, default=math.nan),
               "mean": _mean(latencies), **percentiles(latencies)}
        queue = [r.queue_time_ms for r in ok if r.queue_time_ms is not None]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
        itl = [gap for r in ok if r.itl_ms for gap in r.itl_ms]  # pooled, as vLLM does
        lags = [r.send_lag_ms for r in self.records if r.send_lag_ms is not None]
        lag = percentiles(lags, (50, 99))
        api = self.api
        streamed = api == "openai"
        return {
            "api": api,
            "ttft_source": TTFT_SOURCES.get(api),
            "total_requests": len(self.records),
            "successful": len(ok),
            "failed": len(self.records) - len(ok),
            "success_rate": len(ok) / len(self.records) if self.records else math.nan,
            "latency_ms": lat,
            "total_time_s": wall,
            "requests_per_sec": len(ok) / wall if wall > 0 else math.nan,
            "requests_per_min": 60 * len(ok) / wall if wall > 0 else math.nan,
            "output_tokens": tokens,
            "output_tokens_per_sec": tokens / wall if wall > 0 else math.nan,
            "queue_time_ms": {"mean": _mean(queue), **percentiles(queue, (50, 95))},
            "ttft_ms": {"mean": _mean(ttft), **percentiles(ttft)},
            "itl_ms": {"mean": _mean(itl), **percentiles(itl)},
            "tpot_ms": {"mean": _mean(tpot), **percentiles(tpot)},
            "stream_chunks": sum(r.chunks or 0 for r in ok) if streamed else None,
            # successful streamed responses whose tokens are counted chunks (no usage sent)
            "responses_without_usage": (sum(r.tokens_from_usage is False for r in ok)
                                        if streamed else None),
            "errors_by_type": self.errors_by_type(),
            # several max_tokens (a mix): latency and TTFT of each length's requests
            "by_max_tokens": self.by_max_tokens() if len(self.max_tokens_values()) > 1 else None,
            "send_lag_ms": lag,
            "client_bound": self.client_bound(lag["p99"], lat["p50"]),
            "client_loop_lag_ms": self.loop_lag(),
            "client_saturated": self.client_saturated(percentiles(itl, (50,))["p50"]),
            "workers": self.config.get("workers", 1),
            "server": self.server_description(),
            "config": self.config,
        }

    @property
    def api(self) -> str:
        """"generate" (the seed's POST /generate) or "openai" (streamed /v1/completions)."""
        return self.config.get("api") or "generate"

    def wall_time_s(self) -> float:
        """From the first request's scheduled send to the last completion."""
        if not self.records:
            return 0.0
        return max(r.done_s for r in self.records) - min(r.scheduled_s for r in self.records)

    def max_tokens_values(self) -> list[int]:
        """The distinct max_tokens the requests asked for, shortest first."""
        return sorted({r.max_tokens for r in self.records if r.max_tokens is not None})

    def for_max_tokens(self, max_tokens: int) -> LoadTestResult:
        """The requests that asked for `max_tokens` tokens, as a result of their own (their
        latencies and TTFT; its throughput counts only them, over their own first-to-last
        span)."""
        return LoadTestResult([r for r in self.records if r.max_tokens == max_tokens],
                              {**self.config, "max_tokens": max_tokens})

    def by_max_tokens(self) -> dict[int, dict]:
        """{max_tokens: requests, successful, latency p50/p95, TTFT p50/p95 (ms)} for each
        length asked for."""
        out = {}
        for length in self.max_tokens_values():
            ok = [r for r in self.records if r.max_tokens == length and r.ok]
            total = sum(r.max_tokens == length for r in self.records)
            ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
            out[length] = {"requests": total, "successful": len(ok),
                           "latency_ms": percentiles([r.latency_ms for r in ok], (50, 95)),
                           "ttft_ms": percentiles(ttft, (50, 95))}
        return out

    def errors_by_type(self) -> dict[str, dict]:
        errors: dict[str, dict] = {}
        for r in self.records:
            if not r.ok:
                entry = errors.setdefault(r.error_type or "error", {"count": 0, "example": r.error})
                entry["count"] += 1
        return errors

    @staticmethod
    def client_bound(lag_p99_ms: float, latency_p50_ms: float) -> bool:
        if math.isnan(lag_p99_ms):
            return False
        threshold = CLIENT_LAG_WARN_MS
        if not math.isnan(latency_p50_ms):
            threshold = max(threshold, CLIENT_LAG_WARN_SHARE * latency_p50_ms)
        return lag_p99_ms > threshold

    def loop_lag(self) -> dict:
        """p50, p99 and max of the client's event-loop lag (ms), over every worker."""
        samples = self.config.get("client_loop_lag_ms") or []
        return {**percentiles(samples, (50, 99)), "max": max(samples, default=math.nan)}

    def client_saturated(self, itl_p50_ms: float = math.nan) -> bool:
        """Whether the client's own event loop lagged enough to distort what it timed: p99 over
        CLIENT_LOOP_LAG_WARN_MS, or over a quarter of the median gap between streamed chunks."""
        p99 = self.loop_lag()["p99"]
        if math.isnan(p99):
            return False
        threshold = CLIENT_LOOP_LAG_WARN_MS
        if not math.isnan(itl_p50_ms):
            threshold = min(threshold, max(1.0, 0.25 * itl_p50_ms))
        return p99 > threshold

    def server_description(self) -> dict | None:
        """Model and device as the server reported them (first successful response)."""
        for r in self.records:
            if r.ok and r.model is not None:
                return {"model": r.model, "device": r.device, "gpu_name": r.gpu_name,
                        "synthetic": r.synthetic}
        return None

    def report(self, explain: bool = False) -> str:
        """The seed's LOAD TEST RESULTS block, then tokens, server-side times, errors, lag."""
        s = self.summary()
        lines = [*_results_block(s), "", *self._tokens_block(s), "", *_timing_block(s)]
        stopped = self.config.get("interrupted")
        if stopped:  # Ctrl-C: the figures are those of the requests that ended
            lines.insert(3, f"INTERRUPTED after {stopped['finished']} of {stopped['requested']} "
                            "requests: the figures below cover those (the ones in flight were "
                            "dropped)")
        if s["by_max_tokens"]:
            lines += ["", *self._length_block(s["by_max_tokens"])]
        lines += ["", *_errors_block(s["errors_by_type"]), "", *_lag_block(s),
                  "", *self._setup_block(s["server"]), RULE]
        if explain:
            lines += ["", DEFINITIONS]
        return "\n".join(lines)

    def _tokens_block(self, s: dict) -> list[str]:
        """Output tokens per second, and where the token counts came from."""
        return ["Tokens:",
                f"  Output tokens/sec: {_num(s['output_tokens_per_sec'], 1)} "
                f"({s['output_tokens']} tokens in {s['successful']}{self._token_source(s)})"]

    def _setup_block(self, server: dict | None) -> list[str]:
        """How the test ran and, when the server said, what it served on which device."""
        lines = ["Setup:", f"  {self._describe_setup()}"]
        if server:
            where = server["gpu_name"] or (f"{server['device']} (no GPU)" if server["device"]
                                           else "a device it does not report")
            synthetic = ("  [synthetic: random weights, meaningless text; real timings]"
                         if server["synthetic"] else "")
            lines.append(f"  Server: {server['model']} on {where}{synthetic}")
        return lines

    def _length_block(self, by_length: dict[int, dict]) -> list[str]:
        """One line per max_tokens of a mix: its share of the requests, latency and TTFT."""
        lines = [f"By max_tokens (a mix, order drawn with seed {self.config.get('seed', 0)}):",
                 f"  {'max_tokens':>10} {'requests':>9} {'p50 ms':>8} {'p95 ms':>8} "
                 f"{'TTFT p50':>9} {'TTFT p95':>9}"]
        for length, entry in by_length.items():
            lat, ttft = entry["latency_ms"], entry["ttft_ms"]
            lines.append(f"  {length:>10} {entry['requests']:>9} {_ms(lat['p50']):>8} "
                         f"{_ms(lat['p95']):>8} {_ms(ttft['p50']):>9} {_ms(ttft['p95']):>9}")
        return lines

    @staticmethod
    def _token_source(s: dict) -> str:
        """' responses' plus, for a stream, where its token counts came from."""
        if s["api"] != "openai":
            return " responses"
        missing = s["responses_without_usage"]
        if not missing:
            return " responses, from the server's usage"
        if missing == s["successful"]:
            return (" responses; counted as streamed chunks: the server sent no usage, and a "
                    "chunk may carry more than one token")
        return (f" responses; {missing} of them sent no usage: their streamed chunks counted "
                "instead")

    def _describe_setup(self) -> str:
        c = self.config
        if c.get("rate"):
            loop = f"open loop, Poisson arrivals at {c['rate']:g} req/s"
            loop += f", at most {c['concurrency']} in flight" if c.get("concurrency") else ""
        else:
            loop = f"closed loop, concurrency {c.get('concurrency')}"
        urls = c.get("urls") or []
        where = urls[0] if len(urls) == 1 else f"{len(urls)} URLs round-robin"
        api = ""
        if self.api == "openai":
            api = f", OpenAI API, model {c.get('model')}" + (", ignore_eos" if c.get(
                "ignore_eos") else "") + (", API key from OPENAI_API_KEY" if c.get(
                "api_key_from_env") else "")
        lengths = _lengths(c.get("max_tokens"))
        return (f"{len(self.records)} requests, {loop}, max_tokens {lengths}, "
                f"temperature {c.get('temperature')}{api}, {where}"
                + (f", {c['warmup']} warm-up request(s) not counted" if c.get("warmup") else ""))

    def to_dataframe(self):
        """One row per request (records plus send_lag_ms, ttft_ms, tpot_ms)."""
        import pandas as pd

        return pd.DataFrame([r.as_dict() for r in self.records])

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<LoadTestResult {s['successful']}/{s['total_requests']} ok, "
                f"p50 {_ms(s['latency_ms']['p50'])} ms, {_num(s['requests_per_sec'], 2)} req/s>")

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the report
        printer.text(self.report())


RULE = "=" * 60


def _results_block(s: dict) -> list[str]:
    """The seed's LOAD TEST RESULTS block: success rate, latency, throughput."""
    lat, per_min = s["latency_ms"], s["requests_per_min"]
    return [
        RULE, "LOAD TEST RESULTS", RULE, "",
        "Success Rate:",
        f"  Total requests: {s['total_requests']}",
        f"  Successful: {s['successful']}",
        f"  Success rate: {_pct(s['success_rate'])}",
        "",
        "Latency (ms):",
        f"  Min: {_ms(lat['min'])}",
        f"  Max: {_ms(lat['max'])}",
        f"  Mean: {_ms(lat['mean'])}",
        f"  Median (p50): {_ms(lat['p50'])}",
        f"  p95: {_ms(lat['p95'])}",
        f"  p99: {_ms(lat['p99'])}",
        "",
        "Throughput:",
        f"  Total time: {s['total_time_s']:.1f}s",
        f"  Requests/sec: {_num(s['requests_per_sec'], 2)}",
        f"  Requests/min: {_num(per_min, 0 if per_min >= 10 else 1)}",
        RULE,
    ]


def _timing_block(s: dict) -> list[str]:
    """TTFT, ITL and TPOT measured by a streaming client, or the server's own fields."""
    ttft, tpot, itl = s["ttft_ms"], s["tpot_ms"], s["itl_ms"]
    if s["api"] == "openai":
        return [
            f"Client side (OpenAI API, streaming, {s['stream_chunks']} chunks):",
            f"  TTFT (ms, {s['ttft_source']}): mean {_ms(ttft['mean'])}, "
            f"p50 {_ms(ttft['p50'])}, p95 {_ms(ttft['p95'])}, p99 {_ms(ttft['p99'])}",
            f"  ITL (ms, between chunks carrying text): mean {_num(itl['mean'], 2)}, "
            f"p50 {_num(itl['p50'], 2)}, p95 {_num(itl['p95'], 2)}, "
            f"p99 {_num(itl['p99'], 2)}",
            f"  TPOT (ms per output token): mean {_num(tpot['mean'], 2)}, "
            f"p50 {_num(tpot['p50'], 2)}, p95 {_num(tpot['p95'], 2)}",
        ]
    return [
        "Server side (from response fields):",
        f"  Queue time (ms): mean {_ms(s['queue_time_ms']['mean'])}, "
        f"p95 {_ms(s['queue_time_ms']['p95'])}",
        f"  TTFT (ms, send -> first token, {s['ttft_source']}): "
        f"mean {_ms(ttft['mean'])}, p95 {_ms(ttft['p95'])}",
        f"  TPOT (ms per output token): mean {_num(tpot['mean'], 2)}",
    ]


def _errors_block(errors: dict[str, dict]) -> list[str]:
    """Failed requests by type, most frequent first, each with an example message."""
    lines = ["Errors by type:"]
    if not errors:
        lines.append("  none")
    for kind, entry in sorted(errors.items(), key=lambda kv: -kv[1]["count"]):
        example = (entry["example"] or "")[:160]
        lines.append(f"  {kind}: {entry['count']}" + (f"  (e.g. {example})" if example else ""))
    return lines


def _lag_block(s: dict) -> list[str]:
    """The client's send lag and event-loop lag, with a warning when either distorts timings."""
    lag, loop = s["send_lag_ms"], s["client_loop_lag_ms"]
    workers = f", {s['workers']} processes" if s["workers"] > 1 else ""
    lines = [f"Client send lag (ms): p50 {_num(lag['p50'], 2)}, p99 {_num(lag['p99'], 2)}",
             f"Client event-loop lag (ms{workers}): p50 {_num(loop['p50'], 2)}, "
             f"p99 {_num(loop['p99'], 2)}, max {_num(loop['max'], 2)}"]
    if s["client_saturated"]:
        read = "chunks" if s.get("api") == "openai" else "responses"  # /generate has no chunks
        lines.append(
            f"  WARNING: the client was saturated: its event loop ran late (p99 "
            f"{loop['p99']:.1f} ms), so it read {read} and sent requests late and its "
            "timings include its own delay. Use more processes (--workers N).")
    if s["client_bound"]:
        lines.append(
            "  WARNING: the client, not the server, is the bottleneck: requests left late "
            f"(p99 {lag['p99']:.1f} ms). Latencies include the client's own delay; use fewer "
            "concurrent requests, a lower --rate, or several load-test processes.")
    return lines


def _lengths(max_tokens) -> str:
    """max_tokens as configured: one number, or a mix {length: share}: '16 (80 %) / 256 (20 %)'."""
    if not isinstance(max_tokens, dict):
        return str(max_tokens)
    return " / ".join(f"{length} ({100 * share:.0f} %)" for length, share in max_tokens.items())


def _ms(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _num(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
