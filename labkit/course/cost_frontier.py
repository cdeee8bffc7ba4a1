"""Notebook 09 and its exercises: the cost frontier, from the seed's baseline to the best this
device does at a latency target (SLO).

The experiment: `start_servers` starts one `labkit serve` per set-up (`SETUPS`: sequential, the
seed's baseline; batched; continuous), all loading at once, and `wait_ready` waits for all of
them, so no server's start-up (on a GPU: CUDA-graph capture) runs under another's measurement.
`run` then sweeps one server: `labkit loadtest --sweep` in a process of its own (the command a
learner runs from a shell, `Load.command`), streamed from `/v1/completions` at the seed's
sampling defaults, every request exactly `max_tokens` long (`--ignore-eos`), under the live
timeline; each point gets the sampler's utilization and SM activity over its own window (the
sweep JSON's `window_s`). A client in the notebook's own process would share Python's lock with
the timeline's redraws and time its streams late by as much.

`summary_rows` takes each set-up at its best point under the SLO (`labkit.measure.sweep.best`:
the most output tok/s per GPU among the points that meet it) and prices it
(`labkit.measure.cost.cost_per_million_tokens`); `findings` says what the rows show, both sides
of every verdict computed (tests/test_findings.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.course import experiments, notebook
from labkit.course.continuous_batching import (
    SERVER_START_TIMEOUT_S,
    stop_servers,  # noqa: F401 (the notebook stops its servers with lab.stop_servers)
)
from labkit.course.findings import CPU_SPEED, FLAT_SPREAD
from labkit.measure import cost, sweep, utilization
from labkit.serve import client
from labkit.serve.launcher import ServerProcess

SETUPS = ("sequential", "batched", "continuous")  # the course's order: baseline first
BASELINE = SETUPS[0]
SWEEP_TIMEOUT_S = 1800.0


@dataclass
class Load:
    """What every point of a sweep sends: requests of exactly `max_tokens` tokens at
    `temperature` (the seed's 0.7), streamed; at each level max(`min_requests`, 2 × the level)
    of them, from up to `workers` client processes."""

    max_tokens: int = 150
    temperature: float = 0.7
    min_requests: int = 8
    workers: int = 1

    def flags(self, levels: list[int], slo: sweep.SLO) -> list[str]:
        """`labkit loadtest` flags of the sweep (all but --url, --json, --label)."""
        flags = ["--api", "openai", "--sweep", ",".join(map(str, levels)), "--ignore-eos",
                 "--max-tokens", str(self.max_tokens), "--temperature", f"{self.temperature:g}",
                 "--requests", str(self.min_requests), "--workers", str(self.workers)]
        if slo.ttft_p95_ms:
            flags += ["--slo-ttft-ms", f"{slo.ttft_p95_ms:g}"]
        if slo.tokens_per_user:
            flags += ["--slo-tokens-per-user", f"{slo.tokens_per_user:g}"]
        return flags

    def cli(self, levels: list[int], slo: sweep.SLO) -> str:
        """The same sweep from a shell."""
        return " ".join(["labkit loadtest --url URL/v1", *self.flags(levels, slo),
                         "--json sweep.json"])

    def describe(self) -> str:
        return (f"requests of exactly {self.max_tokens} tokens at temperature "
                f"{self.temperature:g}, streamed from /v1/completions; at each level "
                f"max({self.min_requests}, 2 × the level) of them")


@dataclass
class Setup:
    """One server's sweep: its document (`labkit.measure.sweep`), with each point's utilization
    added, the sampler's frame and the final timeline."""

    name: str
    doc: dict
    model: str = ""
    device: str = "CPU"
    frame: Any = None
    timeline: Any = None

    @property
    def points(self) -> list[dict]:
        return self.doc["points"]


def server_flags(name: str, max_batch_size: int) -> list[str]:
    """`labkit serve` flags of each set-up: batched with the course's flags (notebooks 06-08),
    the others with their defaults."""
    if name not in SETUPS:
        raise ValueError(f"set-up must be one of {', '.join(SETUPS)}, got {name!r}")
    return experiments.batched_flags(max_batch_size) if name == "batched" else []


def start_servers(model: str, names: tuple[str, ...] = SETUPS, *,
                  max_batch_size: int = 64) -> dict[str, ServerProcess]:
    """One `labkit serve --mode NAME` per set-up, all loading at once in the background."""
    return {name: ServerProcess(model, mode=name,
                                extra_args=server_flags(name, max_batch_size)).start()
            for name in names}


def wait_ready(servers: dict[str, ServerProcess]) -> dict[str, ServerProcess]:
    for server in servers.values():
        server.wait_ready(SERVER_START_TIMEOUT_S)
    return servers


def sweep_process(url: str, levels: list[int], load: Load, slo: sweep.SLO,
                  label: str) -> dict:
    """`labkit loadtest --sweep` against `url` in a process of its own, its JSON read back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.json"
        command = [sys.executable, "-m", "labkit", "loadtest", "--url", url, "--label", label,
                   *load.flags(levels, slo), "--json", str(path), "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
        if not path.exists():
            raise RuntimeError(f"labkit loadtest --sweep failed (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        return sweep.load(path)


def run(server: ServerProcess, name: str, levels: list[int], load: Load, slo: sweep.SLO, *,
        live: bool = True) -> Setup:
    """Sweep one ready server under the live timeline (`live`: in a notebook), then add each
    point's utilization over its own window."""
    url = server.url
    health = client.get(url + "/health").body
    model = health["model"]
    sampler = utilization.UtilizationSampler(interval=0.1, url=url, server_stats=True)
    with ExitStack() as stack:
        watch, view = (lambda fn, *a, **k: fn(*a, **k)), None
        if live:
            from labkit.measure import plots  # matplotlib: only where a timeline is drawn

            view = stack.enter_context(plots.LiveTimeline(
                sampler, model=model, refresh=2.0,
                title=f"{name} server: concurrency {', '.join(map(str, levels))}"))
            watch = view.watch
        else:
            stack.enter_context(sampler)
        doc = watch(sweep_process, url, levels, load, slo, name)
        for point in doc["points"]:
            _add_utilization(point, sampler)
    return Setup(name, doc, model, health["gpu_name"] or "CPU", sampler.frame(),
                 view.figure if view is not None else None)


def _add_utilization(point: dict, sampler: utilization.UtilizationSampler) -> None:
    """The sampler's view of one point's window, and a mark where the point began."""
    window = point.get("window_s")
    util = sampler.summary(*window) if window else {}
    point.update(mean_util=util.get("mean_util"), sm_activity_mean=util.get("sm_activity_mean"),
                 utilization_source=util.get("source", sampler.source))
    if window:
        sampler.mark(f"c={point['level']:g}", start=window[0])


def save_sweeps(setups: dict[str, Setup], folder: Path = notebook.RESULTS_DIR) -> dict[str, Path]:
    """Each set-up's sweep document as `labkit loadtest --sweep` writes it, for `--compare`;
    the paths relative to the repository when they are in it."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: sweep.save(s.doc, folder / f"sweep_{name}.json")
             for name, s in setups.items()}
    root = notebook.RESULTS_DIR.parent
    return {name: p.relative_to(root) if p.is_relative_to(root) else p
            for name, p in paths.items()}


def frontier(setups: dict[str, Setup], slo: sweep.SLO):
    """Every set-up's frontier on one plot (`labkit.measure.frontier_plot`)."""
    from labkit.measure import frontier_plot

    return frontier_plot.plot_frontier([s.doc for s in setups.values()], slo=slo)


def points_table(setup: Setup) -> str:
    """One set-up's points, with the utilization of each point's window."""
    cpu = any(p.get("utilization_source") == "cpu-mode" for p in setup.points)
    extra = [("busy %" if cpu else "util %", 7, lambda p: _num(p.get("mean_util"), 1))]
    if not cpu:
        extra.append(("SM %", 6, lambda p: _num(p.get("sm_activity_mean"), 1)))
    return sweep.table(setup.doc, extra)


# --- each set-up at its best point under the SLO ---------------------------------------------

def summary_row(setup: Setup, slo: sweep.SLO, price_per_hour: float) -> dict:
    """A set-up at its best point under the SLO (or, when none meets it, its highest output
    tok/s, `meets_slo` False): what it serves, at what latency and utilization, and what a
    million of its output tokens cost at `price_per_hour`."""
    chosen = sweep.best(setup.points, slo) or max(
        setup.points, key=lambda p: _or_zero(p["output_tokens_per_sec_per_gpu"]))
    tokens = chosen["output_tokens_per_sec_per_gpu"]
    return {
        "setup": setup.name, "model": setup.model, "device": setup.device,
        "concurrency": chosen["level"], "meets_slo": chosen["meets_slo"],
        "output_tokens_per_sec": tokens, "tokens_per_user": chosen["tokens_per_user"],
        "ttft_p95_ms": chosen["ttft_p95_ms"], "p95_ms": chosen["latency_p95_ms"],
        "goodput_rps": chosen["goodput_rps"], "goodput_share": chosen["goodput_share"],
        "mean_util": chosen.get("mean_util"), "sm_activity_mean": chosen.get("sm_activity_mean"),
        "utilization_source": chosen.get("utilization_source"),
        "knee": setup.doc["knee"], "price_per_hour": price_per_hour,
        "usd_per_million_tokens": (cost.cost_per_million_tokens(price_per_hour, tokens)
                                   if _or_zero(tokens) > 0 else math.nan),
    }


def summary_rows(setups: dict[str, Setup], slo: sweep.SLO, price_per_hour: float) -> list[dict]:
    """`summary_row` of each set-up, each with how many times cheaper than the baseline's
    (`cheaper`: None where either point missed the SLO: they would not serve the same
    users)."""
    rows = [summary_row(s, slo, price_per_hour) for s in setups.values()]
    base = next((r for r in rows if r["setup"] == BASELINE), None)
    for r in rows:
        r["cheaper"] = (base["usd_per_million_tokens"] / r["usd_per_million_tokens"]
                        if base and base["meets_slo"] and r["meets_slo"] else None)
    return rows


def best_table(rows: list[dict], slo: sweep.SLO) -> str:
    """Each set-up's best point under the SLO: goodput, throughput, cost, utilization."""
    lines = [f"best point under the SLO ({slo.describe()}), priced at "
             f"${rows[0]['price_per_hour']:.2f}/h",
             f"{'set-up':<12} {'conc':>5} {'out tok/s':>10} {'tok/s/user':>11} "
             f"{'goodput':>8} {'met':>5} {'$/M tok':>9} {'cheaper':>8} {'util %':>7}"]
    for r in rows:
        level = f"{r['concurrency']:g}" if r["meets_slo"] else "-"
        lines.append(f"{r['setup']:<12} {level:>5} {_num(r['output_tokens_per_sec']):>10} "
                     f"{_num(r['tokens_per_user'], 1):>11} {_num(r['goodput_rps'], 2):>8} "
                     f"{_pct(r['goodput_share']):>5} {_usd(r):>9} {_cheaper(r):>8} "
                     f"{_num(r['mean_util'], 1):>7}")
    lines.append("goodput: requests/s that met the SLO one by one (met: their share); a set-up "
                 "with no point under the SLO: its highest throughput, conc '-'")
    return "\n".join(lines) + _util_note(rows)


def summary_table(rows: list[dict]) -> str:
    """The course in one table: the baseline, then each fix, at its best point under the SLO."""
    cpu = any(r.get("utilization_source") == "cpu-mode" for r in rows)
    lines = [f"{'set-up':<12} {'out tok/s':>10} {'busy %' if cpu else 'util %':>7} "
             f"{'SM %':>6} {'p95 ms':>8} {'$/M tok':>9} {'cheaper':>8}  SLO"]
    for r in rows:
        lines.append(f"{r['setup']:<12} {_num(r['output_tokens_per_sec']):>10} "
                     f"{_num(r['mean_util'], 1):>7} {_num(r['sm_activity_mean'], 1):>6} "
                     f"{_num(r['p95_ms']):>8} {_usd(r):>9} {_cheaper(r):>8}  "
                     + (f"met at c={r['concurrency']:g}" if r["meets_slo"] else "missed"))
    return "\n".join(lines) + _util_note(rows)


def _util_note(rows: list[dict]) -> str:
    if any(r.get("utilization_source") == "cpu-mode" for r in rows):
        return ("\nbusy % = CPU mode: the share of time the server was generating, from its "
                "/stats, not GPU utilization; no SM activity without a GPU")
    return "\nutil % = NVML utilization.gpu over the point's window; SM % = NVML GPM"


def _or_zero(value) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _num(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0%}"


def _usd(row: dict) -> str:
    value = row["usd_per_million_tokens"]
    return "-" if math.isnan(value) else f"${value:,.2f}" if value >= 1 else f"${value:.3f}"


def _cheaper(row: dict) -> str:
    if row["setup"] == BASELINE:
        return "baseline"
    return "-" if row["cheaper"] is None else f"{row['cheaper']:,.1f}x"


# --- what you saw ----------------------------------------------------------------------------

def findings(setups: dict[str, Setup], rows: list[dict], slo: sweep.SLO) -> str:
    """Notebook 09's conclusions from its sweeps and summary rows, never assumed."""
    base = setups[BASELINE]
    lines = [_queue_line(base)]
    lines += [_dominance(base, other) for name, other in setups.items() if name != BASELINE]
    lines += [_knee(s) for s in setups.values()]
    lines.append(_slo_line(rows, slo))
    lines.append(_cost_line(rows))
    lines.append(_utilization_line(rows))
    return "\n".join(f"- {line}" for line in lines if line)


def _queue_line(base: Setup) -> str:
    """The baseline's lowest and highest level: what the load added (TTFT) and what it should
    not have changed (tok/s per user: one generation at a time runs alone)."""
    low, high = base.points[0], base.points[-1]
    if low is high:
        return ""
    speeds = (low["tokens_per_user"], high["tokens_per_user"])
    apart = max(speeds) / min(speeds) if min(speeds) > 0 else math.inf
    cpu = low.get("utilization_source") == "cpu-mode"
    text = (f"{base.name}: from c={low['level']:g} to c={high['level']:g}, p95 TTFT went from "
            f"{_num(low['ttft_p95_ms'])} to {_num(high['ttft_p95_ms'])} ms and tok/s per user "
            f"from {_num(speeds[0], 1)} to {_num(speeds[1], 1)}, ")
    if apart < FLAT_SPREAD:
        return text + (f"within {FLAT_SPREAD - 1:.0%} of each other: the load added waiting "
                       "in the queue, not speed; its frontier is one point, repeated.")
    return text + (f"more than {FLAT_SPREAD - 1:.0%} apart: the decode itself ran at another "
                   "speed at the higher level, which a queue does not do."
                   + (f" {CPU_SPEED}" if cpu else ""))


def _dominance(base: Setup, other: Setup) -> str:
    """Whether `other`'s frontier dominates the baseline's at every measured point."""
    left = sweep.undominated(base.points, by=other.points)
    if not left:
        return (f"The {other.name} server's frontier dominates the {base.name} one at every "
                f"measured point: for each of the baseline's {len(base.points)} points, a "
                f"{other.name} point gave at least as many output tok/s per GPU at at least as "
                "many tok/s per user.")
    first = left[0]
    fastest = max(other.points, key=lambda p: _or_zero(p["tokens_per_user"]))
    levels = ", ".join(f"c={p['level']:g}" for p in left)
    return (f"The {other.name} server's frontier does NOT dominate the {base.name} one at "
            f"{levels}: at c={first['level']:g} the baseline gave "
            f"{_num(first['output_tokens_per_sec_per_gpu'])} tok/s at "
            f"{_num(first['tokens_per_user'], 1)} tok/s per user, and no {other.name} point had "
            f"both (its fastest per user: {_num(fastest['tokens_per_user'], 1)} tok/s per user "
            f"at c={fastest['level']:g}). " + _why_not(first, fastest, other.name))


def _why_not(base_point: dict, fastest: dict, name: str) -> str:
    if _or_zero(fastest["tokens_per_user"]) < _or_zero(base_point["tokens_per_user"]):
        return (f"The baseline decoded faster per user there than the {name} server did at any "
                "level, and more throughput does not buy per-user speed back.")
    return (f"The {name} points as fast per user served fewer tok/s in total than the "
            "baseline did there.")


def _knee(setup: Setup) -> str:
    knee = next((p for p in setup.points if p["level"] == setup.doc["knee"]), None)
    if knee is None:
        return f"{setup.name}: no point had both a throughput and a per-user speed."
    top = max(setup.points, key=lambda p: _or_zero(p["output_tokens_per_sec_per_gpu"]))
    return (f"{setup.name}: knee at c={knee['level']:g} ({_num(knee['output_tokens_per_sec'])} "
            f"tok/s at {_num(knee['tokens_per_user'], 1)} tok/s per user)"
            + ("; it is also the highest throughput measured." if top is knee else
               f"; the highest throughput, {_num(top['output_tokens_per_sec'])} tok/s at "
               f"c={top['level']:g}, cost {_shrink(knee, top)} of the per-user speed."))


def _shrink(knee: dict, top: dict) -> str:
    if not (_or_zero(knee["tokens_per_user"]) and _or_zero(top["tokens_per_user"])):
        return "an unknown share"
    return f"{1 - top['tokens_per_user'] / knee['tokens_per_user']:.0%}"


def _slo_line(rows: list[dict], slo: sweep.SLO) -> str:
    met = [r for r in rows if r["meets_slo"]]
    missed = [r["setup"] for r in rows if not r["meets_slo"]]
    text = f"Under the SLO ({slo.describe()}): " + "; ".join(
        f"{r['setup']} at best c={r['concurrency']:g}, {_num(r['output_tokens_per_sec'])} tok/s "
        f"per GPU, goodput {_num(r['goodput_rps'], 2)} req/s ({_pct(r['goodput_share'])} of "
        "its requests)" for r in met)
    if missed:
        text += ("; " if met else "") + (f"{', '.join(missed)} met it at no measured level "
                                         "(try a lower one, or a looser SLO)")
    return text + "."


def _cost_line(rows: list[dict]) -> str:
    base = next(r for r in rows if r["setup"] == BASELINE)
    priced = ", ".join(f"{r['setup']} {_usd(r)}" for r in rows if r["meets_slo"])
    if not base["meets_slo"]:
        return (f"The baseline met the SLO at no measured level, so nothing serves its users "
                f"at a price to compare; per million output tokens: {priced or 'none met it'}.")
    gains = [f"{r['setup']} {r['cheaper']:,.1f}x" for r in rows
             if r["setup"] != BASELINE and r["cheaper"] is not None]
    return (f"Per million output tokens at ${base['price_per_hour']:.2f}/h: {priced}; "
            + (f"cheaper than the baseline: {', '.join(gains)}." if gains else
               "no other set-up met the SLO to compare."))


def _utilization_line(rows: list[dict]) -> str:
    cpu = any(r.get("utilization_source") == "cpu-mode" for r in rows)
    what = "server busy share (CPU mode, not GPU utilization)" if cpu else "GPU utilization"
    parts = [f"{r['setup']} {_num(r['mean_util'], 1)} %"
             + (f" (SM {r['sm_activity_mean']:.1f} %)" if r.get("sm_activity_mean") is not None
                else "") for r in rows]
    return f"At those points the {what}: " + ", ".join(parts) + "."

