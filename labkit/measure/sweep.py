"""`labkit loadtest --sweep`: the same load at several concurrencies (or arrival rates) against
one server, one point per level, all in one JSON document; what the points say about the
server's frontier: its knee, the points that meet a latency target (SLO), goodput, and whether
one server's frontier dominates another's.

Each point is a closed-loop load test at one concurrency (`--sweep 1,2,4`), or an open-loop one
at one Poisson arrival rate (`--sweep-rates 2,4,8`), of max(`min_requests`, `ROUNDS` × the
level) requests, after one unmeasured round of `WARMUP_TOKENS`-token requests at that level (a
server's first batch of a new size pays one-off costs: a kernel's compilation, a graph's
capture). A point's figures:

- output tok/s (and per GPU: ÷ `gpus`, the GPUs the server runs on), req/s;
- **tok/s per user** = 1000 ÷ the median TPOT (ms): how fast the median user reads the answer
  once it streams (the frontier's x axis; vLLM's TPOT, SemiAnalysis' "interactivity");
- TTFT p50/p95, ITL p50/p95, TPOT p50/p95, latency p50/p95 (`labkit loadtest --explain`);
- **goodput**: requests per second that met the SLO one by one (their own TTFT and TPOT
  within it; vLLM's `bench serve --goodput`), and their share of the requests;
- `meets_slo`: the point as a whole meets it: p95 TTFT within the TTFT target and tok/s per
  user at least the per-user target (the same values the frontier plot draws);
- `window_s`: the perf_counter times of its first send and last answer (the system's monotonic
  clock: a sampler in another process reads its utilization over exactly that window).

The **knee** of a curve is its point with the highest output tok/s × tok/s per user: past it,
each step up in load loses a larger share of per-user speed than it adds of throughput (where
the log-log slope of the frontier passes -1). The **best** point under an SLO is the one that
meets it with the most output tok/s per GPU. The plot is `labkit.measure.frontier_plot`.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit.measure import loadtest
from labkit.measure.loadstats import LoadTestResult, finite

ROUNDS = 2  # each point: at least this many requests per concurrent user
WARMUP_TOKENS = 8  # the unmeasured round before each point
KINDS = ("concurrency", "rate")


@dataclass(frozen=True)
class SLO:
    """A latency target: p95 TTFT at most `ttft_p95_ms`, and at least `tokens_per_user` output
    tok/s per user (TPOT at most 1000 / tokens_per_user ms). Either may be None: no target."""

    ttft_p95_ms: float | None = None
    tokens_per_user: float | None = None

    def __post_init__(self):
        for name in ("ttft_p95_ms", "tokens_per_user"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a positive number, got {value!r}")

    @classmethod
    def from_tpot(cls, ttft_p95_ms: float | None, tpot_ms: float | None) -> SLO:
        return cls(ttft_p95_ms, None if tpot_ms is None else 1000 / tpot_ms)

    @property
    def tpot_ms(self) -> float | None:
        return None if self.tokens_per_user is None else 1000 / self.tokens_per_user

    def request_ok(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """One request within the SLO (goodput): its own TTFT and TPOT."""
        if self.ttft_p95_ms is not None and (ttft_ms is None or ttft_ms > self.ttft_p95_ms):
            return False
        return self.tpot_ms is None or (tpot_ms is not None and tpot_ms <= self.tpot_ms)

    def point_ok(self, point: dict) -> bool:
        """A whole point within the SLO: its p95 TTFT and its tok/s per user."""
        ttft, per_user = point.get("ttft_p95_ms"), point.get("tokens_per_user")
        if self.ttft_p95_ms is not None and not _within(ttft, self.ttft_p95_ms):
            return False
        return self.tokens_per_user is None or (
            per_user is not None and not math.isnan(per_user)
            and per_user >= self.tokens_per_user)

    def describe(self) -> str:
        parts = ([f"TTFT p95 ≤ {_short(self.ttft_p95_ms)} ms"] if self.ttft_p95_ms else []) + (
            [f"≥ {self.tokens_per_user:g} tok/s per user (TPOT ≤ {self.tpot_ms:.1f} ms)"]
            if self.tokens_per_user else [])
        return " and ".join(parts) or "no SLO"

    def as_dict(self) -> dict:
        return asdict(self)


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def _within(value: float | None, limit: float) -> bool:
    return value is not None and not math.isnan(value) and value <= limit


def point(result: LoadTestResult, level: float, *, kind: str = "concurrency",
          slo: SLO = SLO(), gpus: int = 1) -> dict:
    """One point's figures (see the module's docstring) from its load test's result."""
    s = result.summary()
    ok = result.ok_records
    wall = result.wall_time_s()
    good = sum(slo.request_ok(r.ttft_ms, r.tpot_ms) for r in ok)
    tpot_p50 = s["tpot_ms"]["p50"]
    t0 = (result.config or {}).get("t0_perf_counter")
    row = {
        "kind": kind, "level": level,
        "concurrency": level if kind == "concurrency" else None,
        "rate": level if kind == "rate" else None,
        "requests": s["total_requests"], "successful": s["successful"],
        "requests_per_second": s["requests_per_sec"],
        "output_tokens_per_sec": s["output_tokens_per_sec"],
        "output_tokens_per_sec_per_gpu": s["output_tokens_per_sec"] / gpus,
        "tokens_per_user": 1000 / tpot_p50 if tpot_p50 and not math.isnan(tpot_p50) else math.nan,
        "tpot_p50_ms": tpot_p50, "tpot_p95_ms": s["tpot_ms"]["p95"],
        "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p95_ms": s["ttft_ms"]["p95"],
        "itl_p50_ms": s["itl_ms"]["p50"], "itl_p95_ms": s["itl_ms"]["p95"],
        "latency_p50_ms": s["latency_ms"]["p50"], "latency_p95_ms": s["latency_ms"]["p95"],
        "goodput_rps": good / wall if wall > 0 else math.nan,
        "goodput_share": good / len(result.records) if result.records else math.nan,
        "client_saturated": s["client_saturated"] or s["client_bound"],
        "window_s": _window(result, t0),
    }
    row["meets_slo"] = slo.point_ok(row)
    return row


def _window(result: LoadTestResult, t0: float | None) -> list[float] | None:
    if t0 is None or not result.records:
        return None
    return [t0 + min(r.scheduled_s for r in result.records),
            t0 + max(r.done_s for r in result.records)]


def requests_at(level: float, min_requests: int, rounds: int = ROUNDS) -> int:
    """Requests measured at one level: at least `rounds` per concurrent user (or per unit of
    rate: `rounds` seconds of arrivals), and never fewer than `min_requests`."""
    return max(min_requests, math.ceil(rounds * level))


def measure_point(url: str, level: float, *, kind: str = "concurrency", slo: SLO = SLO(),
                  gpus: int = 1, requests: int, workers: int = 1,
                  warmup_tokens: int = WARMUP_TOKENS, **load) -> tuple[dict, LoadTestResult]:
    """Warm the level up (one round of `warmup_tokens`-token requests, not measured), then
    measure it: (the point's figures, the load test's result). `load`: `loadtest.run`'s
    arguments (api, max_tokens, temperature, prompt, ignore_eos, model, seed, ...)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    users = max(1, math.ceil(level))
    if warmup_tokens:
        loadtest.run(url, concurrency=users, requests=users,
                     **{**load, "max_tokens": warmup_tokens, "progress": False})
    shape = ({"concurrency": int(level)} if kind == "concurrency"
             else {"rate": float(level), "concurrency": None})
    result = loadtest.run(url, requests=requests, workers=max(1, min(workers, users, requests)),
                          **shape, **load)
    return point(result, level, kind=kind, slo=slo, gpus=gpus), result


def run(url: str, levels: Sequence[float], *, kind: str = "concurrency", slo: SLO = SLO(),
        gpus: int = 1, label: str | None = None, min_requests: int = 8, rounds: int = ROUNDS,
        workers: int = 1, on_point: Callable[[dict], None] | None = None, **load) -> dict:
    """The sweep: `measure_point` at each level in turn, as one document (`save` writes it):
    the server, the load, the SLO, every point, the knee and the best point under the SLO.
    `on_point(point)` sees each point as it is measured. A level that cannot run (the server
    died, Ctrl-C) ends the sweep with the points measured before it, the document's `stopped`
    saying where and why: a server that falls over at the highest load is what sweeps find.
    With no point measured yet, the error is raised."""
    levels = check_levels(levels, kind)
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    points, server, config, stopped = [], None, {}, None
    for level in levels:
        try:
            row, result = measure_point(url, level, kind=kind, slo=slo, gpus=gpus,
                                        requests=requests_at(level, min_requests, rounds),
                                        workers=workers, **load)
        except (loadtest.ServerNotReady, ValueError, OSError, KeyboardInterrupt) as err:
            if not points:
                raise
            stopped = {"level": level, "error": "interrupted (Ctrl-C)"
                       if isinstance(err, KeyboardInterrupt) else str(err)}
            break
        points.append(row)
        server = server or result.summary()["server"]
        config = result.config
        if on_point is not None:
            on_point(row)
    doc = document(points, kind=kind, slo=slo, gpus=gpus, server=server, config=config,
                   label=label, url=url)
    return {**doc, "stopped": stopped} if stopped else doc


def document(points: list[dict], *, kind: str, slo: SLO, gpus: int, server: dict | None,
             config: dict, label: str | None, url: str) -> dict:
    """A sweep's JSON document (see `run`)."""
    model = (server or {}).get("model") or config.get("model")
    where = (server or {}).get("gpu_name") or (server or {}).get("device")
    name = label or " on ".join(str(x) for x in (model, where) if x) or url
    best_point = best(points, slo)
    return {
        "what": "labkit loadtest --sweep", "label": name, "url": url,
        "date": datetime.date.today().isoformat(), "server": server, "gpus": gpus,
        "kind": kind, "levels": [p["level"] for p in points], "slo": slo.as_dict(),
        "load": {key: config.get(key) for key in ("api", "model", "max_tokens", "temperature",
                                                   "ignore_eos", "prompts", "seed")},
        "points": points, "knee": (knee(points) or {}).get("level"),
        "best": best_point["level"] if best_point else None,
    }


def check_levels(levels: Sequence[float], kind: str = "concurrency") -> list[float]:
    """The levels, each positive (whole for concurrency), in the order given, none twice."""
    out = [int(x) if kind == "concurrency" else float(x) for x in levels]
    if not out or any(x <= 0 or (kind == "concurrency" and x != float(y))
                      for x, y in zip(out, levels, strict=True)):
        what = "whole numbers ≥ 1" if kind == "concurrency" else "positive rates"
        raise ValueError(f"sweep levels must be {what}, got {list(levels)!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"sweep levels name a level twice: {list(levels)!r}")
    return out


# --- what the points say ----------------------------------------------------------------------

def _finite(point: dict, *keys: str) -> bool:
    return all(isinstance(point.get(k), (int, float)) and math.isfinite(point[k]) for k in keys)


def knee(points: Sequence[dict]) -> dict | None:
    """The point with the highest output tok/s × tok/s per user (see the module's docstring);
    None when no point has both."""
    usable = [p for p in points if _finite(p, "output_tokens_per_sec", "tokens_per_user")]
    return max(usable, key=lambda p: p["output_tokens_per_sec"] * p["tokens_per_user"],
               default=None)


def best(points: Sequence[dict], slo: SLO) -> dict | None:
    """The point that meets `slo` with the most output tok/s per GPU; None if none meets it."""
    meeting = [p for p in points
               if slo.point_ok(p) and _finite(p, "output_tokens_per_sec_per_gpu")]
    return max(meeting, key=lambda p: p["output_tokens_per_sec_per_gpu"], default=None)


def dominates(a: dict, b: dict) -> bool:
    """Point `a` is at least as good as `b` on both axes of the frontier: as many output tok/s
    per GPU, at as many tok/s per user."""
    keys = ("output_tokens_per_sec_per_gpu", "tokens_per_user")
    return _finite(a, *keys) and _finite(b, *keys) and all(a[k] >= b[k] for k in keys)


def undominated(points: Sequence[dict], by: Sequence[dict]) -> list[dict]:
    """The points of one curve that no point of the curve `by` dominates: [] when `by`'s
    frontier dominates this one at every measured point."""
    return [p for p in points if not any(dominates(q, p) for q in by)]


# --- the file ---------------------------------------------------------------------------------

def save(doc: dict, path: str | Path) -> Path:
    """Write the document as standard JSON (NaN as null)."""
    path = Path(path)
    path.write_text(json.dumps(finite(doc), indent=2) + "\n")
    return path


def load(path: str | Path) -> dict:
    """A document `save` wrote (nulls read back as NaN where a number belongs)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("what") != "labkit loadtest --sweep" or "points" not in doc:
        raise ValueError(f"{path} is not a `labkit loadtest --sweep` JSON file")
    numbers = {k for p in doc["points"] for k, v in p.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for p in doc["points"]:
        for key in numbers - {"concurrency", "rate"}:
            if p.get(key) is None:
                p[key] = math.nan
    return doc


# --- the table --------------------------------------------------------------------------------

COLUMNS = [  # (heading, width, the point's key, digits)
    ("req/s", 8, "requests_per_second", 2), ("out tok/s", 10, "output_tokens_per_sec", 0),
    ("tok/s/user", 11, "tokens_per_user", 1), ("TTFT p50", 9, "ttft_p50_ms", 0),
    ("TTFT p95", 9, "ttft_p95_ms", 0), ("ITL p50", 8, "itl_p50_ms", 1),
    ("p95 ms", 8, "latency_p95_ms", 0), ("goodput", 8, "goodput_rps", 2)]


def table(doc: dict, extra: Sequence[tuple[str, int, Callable[[dict], str]]] = (), *,
          marks: bool = True) -> str:
    """One line per point, `extra` columns after the figures; with `marks`, whether it met the
    SLO and which point is the knee and which the best."""
    kind = doc["kind"]
    head = f"{'conc' if kind == 'concurrency' else 'rate/s':>6} " + " ".join(
        f"{name:>{width}}" for name, width, *_ in [*COLUMNS, *extra]) + ("  SLO" if marks else "")
    lines = [f"{doc['label']}: {SLO(**doc['slo']).describe()}" if marks else doc["label"], head]
    for p in doc["points"]:
        cells = [_cell(p.get(key), width, digits) for _, width, key, digits in COLUMNS]
        cells += [f"{cell(p):>{width}}" for _, width, cell in extra]
        lines.append(f"{p['level']:>6g} " + " ".join(cells) + (_marks(doc, p) if marks else ""))
    lines.append("tok/s/user = 1000 / median TPOT; TTFT, ITL and latency in ms; goodput = "
                 "requests/s that met the SLO one by one"
                 + ("; knee = highest out tok/s × tok/s/user" if marks else ""))
    if any(p.get("client_saturated") for p in doc["points"]):
        lines.append("WARNING: the client was saturated at some points (its own delay is in "
                     "their timings): use more processes (--workers N).")
    return "\n".join(lines)


def _marks(doc: dict, point: dict) -> str:
    return (f"  {'met' if point['meets_slo'] else 'missed'}"
            + (" knee" if point["level"] == doc["knee"] else "")
            + (" best" if point["level"] == doc["best"] else ""))


def _cell(value, width: int, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width},.{digits}f}"
