"""The frontier plot of `labkit loadtest --sweep` documents (`labkit.measure.sweep`): output
tok/s per GPU against tok/s per user, one curve per server, the knee marked and the SLO drawn;
beside it each point's p95 TTFT against the same x, the TTFT target drawn.

Both panels are log-log: one plot holds a server at tens of tok/s and one at tens of thousands.
matplotlib's object API only, as in `labkit.measure.plots` (whose import makes a returned
Figure display as a PNG in IPython).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from labkit.measure import plots
from labkit.measure.sweep import SLO, knee


def _usable(points: Sequence[dict]) -> list[dict]:
    keys = ("tokens_per_user", "output_tokens_per_sec_per_gpu", "ttft_p95_ms")
    return sorted((p for p in points if all(
        isinstance(p.get(k), (int, float)) and math.isfinite(p[k]) and p[k] > 0 for k in keys)),
        key=lambda p: p["level"])


def _level(point: dict) -> str:
    return f"c={point['level']:g}" if point["kind"] == "concurrency" else f"{point['level']:g}/s"


def plot_frontier(docs: Sequence[dict], *, slo: SLO | None = None, title: str | None = None,
                  figsize: tuple[float, float] = (13, 5.2)) -> Figure:
    """One curve per sweep document (its `label`): filled markers where the point meets the SLO,
    hollow where it does not, the knee ringed and named. `slo` defaults to the first
    document's."""
    slo = slo or SLO(**docs[0]["slo"])
    fig = Figure(figsize=figsize, layout="constrained")
    frontier, ttft = fig.subplots(1, 2)
    for i, doc in enumerate(docs):
        _curve(frontier, ttft, doc, slo, f"C{i}")
    _limits(frontier, ttft, [p for doc in docs for p in _usable(doc["points"])], slo)
    if slo.tokens_per_user:
        for ax in (frontier, ttft):
            ax.axvline(slo.tokens_per_user, color="0.3", ls="--", lw=1,
                       label=f"SLO: ≥ {slo.tokens_per_user:g} tok/s per user")
    if slo.ttft_p95_ms:
        ttft.axhline(slo.ttft_p95_ms, color="tab:red", ls="--", lw=1,
                     label=f"SLO: TTFT p95 ≤ {slo.ttft_p95_ms:,.0f} ms")
    for ax in (frontier, ttft):
        ax.set_xlabel("tok/s per user = 1000 / median TPOT (log scale)")
        ax.grid(True, which="both", alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    frontier.set_ylabel("output tok/s per GPU (log scale)")
    frontier.set_title("throughput against speed per user: up and right is better",
                       loc="left", fontsize=9)
    ttft.set_ylabel("TTFT p95, ms (log scale)")
    ttft.set_title("time to first token (filled: the point meets the SLO)", loc="left",
                   fontsize=9)
    fig.suptitle(title or f"Cost frontier: {slo.describe()}", fontsize=11)
    return fig


def _limits(frontier, ttft, points: list[dict], slo: SLO) -> None:
    """Log axes padded to a factor of PAD beyond the points and the SLO lines, ticked at 1, 2
    and 5 times powers of ten: a flat curve looks flat, not like noise magnified."""
    xs = [p["tokens_per_user"] for p in points] + [slo.tokens_per_user or math.nan]
    spans = {frontier: [p["output_tokens_per_sec_per_gpu"] for p in points],
             ttft: [p["ttft_p95_ms"] for p in points] + [slo.ttft_p95_ms or math.nan]}
    for ax, ys in spans.items():
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis, values, set_lim in ((ax.xaxis, xs, ax.set_xlim), (ax.yaxis, ys, ax.set_ylim)):
            values = [v for v in values if math.isfinite(v)]
            if values:
                set_lim(min(values) / PAD, max(values) * PAD)
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1
                                                   else f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())


PAD = 1.6


def _curve(frontier, ttft, doc: dict, slo: SLO, color: str) -> None:
    points = _usable(doc["points"])
    if not points:
        return
    x = [p["tokens_per_user"] for p in points]
    frontier.plot(x, [p["output_tokens_per_sec_per_gpu"] for p in points], "-", color=color,
                  lw=1.2, label=doc["label"])
    ttft.plot(x, [p["ttft_p95_ms"] for p in points], "-", color=color, lw=1.2,
              label=doc["label"])
    for p in points:
        face = color if slo.point_ok(p) else "white"
        for ax, y in ((frontier, p["output_tokens_per_sec_per_gpu"]), (ttft, p["ttft_p95_ms"])):
            ax.plot(p["tokens_per_user"], y, "o", color=color, mfc=face, ms=6)
        frontier.annotate(_level(p), (p["tokens_per_user"], p["output_tokens_per_sec_per_gpu"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    top = knee(points)
    if top is not None:
        frontier.plot(top["tokens_per_user"], top["output_tokens_per_sec_per_gpu"], "o",
                      ms=15, mfc="none", mec=color, mew=1.6)
        frontier.annotate(f"knee ({_level(top)})",
                          (top["tokens_per_user"], top["output_tokens_per_sec_per_gpu"]),
                          textcoords="offset points", xytext=(8, -14), fontsize=8,
                          color=color, weight="bold")


def save_png(docs: Sequence[dict], path, slo: SLO | None = None) -> str:
    """Draw `plot_frontier(docs)` into a PNG file."""
    return plots.save(plot_frontier(docs, slo=slo), str(path))
