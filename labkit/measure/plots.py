"""Plots for the lab: the utilization timeline (static and live), latency distribution,
throughput/latency against concurrency, and servers' queues and KV cache side by side.

matplotlib only, through the object API (`matplotlib.figure.Figure`, rendered by Agg): no pyplot
state, so the functions work headless, from a background thread, and never show a figure twice
in Jupyter. Each function returns the Figure; in IPython it displays as a PNG.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from labkit.measure.utilization import (
    COLUMN_LABELS,
    CPU_MODE_LABEL,
    IDLE_THRESHOLD_PCT,
    Mark,
    UtilizationSampler,
    loadtest_t0,
    request_spans,
    summarize,
)

GPM_LINES = {  # column -> (legend label, color)
    "sm_activity": ("SM activity (GPM)", "tab:green"),
    "tensor_activity": ("tensor activity (GPM)", "tab:red"),
    "dram_bw": ("DRAM bandwidth (GPM)", "tab:brown"),
}
# A utilization value describes the period that ends when it is read (the driver's sample period,
# the interval between GPM samples or /stats polls): draw it as a step over that period.
STEPS = "steps-pre"
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}  # legend placement


def _title(what: str, model: str | None, device: str | None, title: str | None) -> str:
    """'<what> — <model> on <card>', unless the caller gave a title."""
    if title:
        return title
    return what + (f" — {model}" if model else "") + (f" on {device}" if device else "")


def _column(frame: Any, col: str) -> np.ndarray | None:
    """The column as floats, or None when absent or entirely missing."""
    if col not in frame:
        return None
    values = np.asarray(frame[col], dtype=float)
    return None if np.isnan(values).all() else values


def _attrs(frame: Any) -> dict[str, Any]:
    attrs = dict(getattr(frame, "attrs", {}) or {})
    attrs.setdefault("source", "cpu-mode" if "busy_pct" in frame else "nvml")
    if attrs.get("t0") is None and len(frame["time"]):
        attrs["t0"] = float(np.asarray(frame["time"])[0] - np.asarray(frame["elapsed_s"])[0])
    return attrs


def merge_spans(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of overlapping spans, sorted: where at least one request was in flight."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def plot_timeline(
    frame: Any,
    marks: Sequence[Mark] | None = None,
    title: str | None = None,
    *,
    model: str | None = None,
    figsize: tuple[float, float] = (11, 6),
) -> Figure:
    """Utilization (and GPM activity where measured) over time, with the spans in which requests
    were in flight shaded; memory and power (NVML) or queue depth (CPU mode) below. When the
    frame has a server's /stats columns (CPU mode, or `UtilizationSampler(server_stats=True)`),
    a panel shows the requests waiting and running in the server and, for a continuous server,
    its KV cache pages in use.

    `frame` is `UtilizationSampler.frame()`; `marks` are `UtilizationSampler.marks`
    (perf_counter times), spans are shaded and instants drawn as vertical lines. The title
    names `model` and the card.
    """
    attrs = _attrs(frame)
    cpu_mode = attrs["source"] == "cpu-mode"
    x = np.asarray(frame["elapsed_s"], dtype=float)
    server_panel = not cpu_mode and any(
        _column(frame, col) is not None for col in ("queue_depth", "in_flight", "kv_pages_used"))
    fig, (top, *middle, bottom) = _timeline_axes(figsize, server_panel)
    _draw_marks(top, bottom, marks or (), attrs.get("t0") or 0.0)
    _plot_utilization_panel(top, frame, x, cpu_mode)
    _title_with_summary(top, frame, attrs)
    if server_panel:
        _plot_server_panel(middle[0], frame, x)
    _plot_lower_panel(bottom, frame, x, cpu_mode)
    bottom.set_xlabel("time since the first sample, s")

    device = attrs.get("device") or None
    what = f"Timeline ({CPU_MODE_LABEL})" if cpu_mode else "GPU timeline"
    fig.suptitle(_title(what, model, device, title), fontsize=11)
    return fig


def _timeline_axes(figsize: tuple[float, float], server_panel: bool) -> tuple[Figure, Any]:
    """The figure and its panels sharing the time axis: utilization, the server's requests
    (when `server_panel`), then memory and power or queue depth."""
    fig = Figure(figsize=(figsize[0], figsize[1] + 2.2) if server_panel else figsize,
                 layout="constrained")
    if server_panel:
        return fig, fig.subplots(3, 1, sharex=True, height_ratios=(2.2, 1, 1))
    return fig, fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))


def _draw_marks(top, bottom, marks: Sequence[Mark], t0: float) -> None:
    """Shade where requests were in flight; draw and label instants as vertical lines."""
    spans = merge_spans((m.start - t0, m.end - t0) for m in marks if m.end is not None)
    for i, (s, e) in enumerate(spans):
        top.axvspan(s, e, color="tab:orange", alpha=0.15, lw=0,
                    label="requests in flight" if i == 0 else None)
    for m in marks:
        if m.end is None:
            for ax in (top, bottom):
                ax.axvline(m.start - t0, color="0.3", ls=":", lw=1)
            top.annotate(m.label, (m.start - t0, 98), fontsize=8, rotation=90, va="top",
                         ha="right")


def _plot_utilization_panel(ax, frame: Any, x: np.ndarray, cpu_mode: bool) -> None:
    """GPU utilization and GPM activity, or in CPU mode the inference worker's busy share."""
    if cpu_mode:
        busy = _column(frame, "busy_pct")
        if busy is not None:
            ax.plot(x, busy, color="tab:blue", lw=1.2, label="inference worker busy",
                    drawstyle=STEPS)
        ax.set_ylabel("worker busy, %\n(CPU mode: not GPU utilization)")
    else:
        util = _column(frame, "gpu_util")
        if util is not None:
            ax.plot(x, util, color="tab:blue", lw=1.2, drawstyle=STEPS,
                    label="GPU utilization (any kernel running)")
        for col, (label, color) in GPM_LINES.items():
            values = _column(frame, col)
            if values is not None:
                ax.plot(x, values, lw=1, color=color, label=label, drawstyle=STEPS)
        ax.set_ylabel("percent of time / of the chip, %")
    ax.axhline(IDLE_THRESHOLD_PCT, color="0.5", ls="--", lw=0.8,
               label=f"idle threshold ({IDLE_THRESHOLD_PCT:g} %)")
    ax.set_ylim(0, 105)
    ax.legend(**OUTSIDE)


def _title_with_summary(ax, frame: Any, attrs: dict[str, Any]) -> None:
    """Mean and peak utilization and the idle share of samples, above the top panel."""
    summary = summarize(frame, source=attrs["source"], device=attrs.get("device", ""))
    if summary["mean_util"] is not None:
        text = (f"mean {summary['mean_util']:.1f} %, peak {summary['peak_util']:.0f} %, "
                f"idle {summary['idle_fraction']:.0%} of samples")
        if "sm_activity_mean" in summary:
            text += f"; mean SM activity {summary['sm_activity_mean']:.1f} %"
        ax.set_title(text, loc="left", fontsize=9)


def _plot_server_panel(ax, frame: Any, x: np.ndarray) -> None:
    """Requests waiting and running in the server (its /stats), and a continuous server's KV
    cache pages in use on a second axis."""
    for col, style in (("queue_depth", "-"), ("in_flight", "--")):
        values = _column(frame, col)
        if values is not None:
            ax.step(x, values, style, where="post", label=COLUMN_LABELS[col])
    ax.set_ylabel("requests")
    ax.set_ylim(bottom=0)
    lines = [ln for ln in ax.get_lines()
             if not ln.get_label().startswith("_")]  # skip unlabelled mark lines
    used = _column(frame, "kv_pages_used")
    if used is not None:
        twin = ax.twinx()
        total = _column(frame, "kv_pages_total")
        of = f" (of {np.nanmax(total):,.0f})" if total is not None else ""
        lines += twin.step(x, used, where="post", color="tab:purple", lw=1.2,
                           label=f"{COLUMN_LABELS['kv_pages_used']}{of}")
        twin.set_ylabel("KV cache pages")
        twin.set_ylim(0, max(1.0, float(np.nanmax(used)) * 1.15))
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left",
                  bbox_to_anchor=(1.08 if used is not None else 1.01, 1.0), fontsize=8)


def _plot_lower_panel(ax, frame: Any, x: np.ndarray, cpu_mode: bool) -> None:
    if cpu_mode:
        _plot_server_panel(ax, frame, x)
        return
    mem = _column(frame, "mem_used_gb")
    if mem is not None:
        ax.plot(x, mem, color="tab:purple", lw=1.2, label="memory used")
        total = _column(frame, "mem_total_gb")
        top = np.nanmax(total) if total is not None else np.nanmax(mem)
        ax.set_ylim(0, top * 1.05)
    ax.set_ylabel("memory used, GB")
    power = _column(frame, "power_w")
    if power is not None:
        twin = ax.twinx()
        twin.plot(x, power, color="tab:red", lw=0.8, alpha=0.7, label="power")
        twin.set_ylabel("power, W")
        twin.set_ylim(0, np.nanmax(power) * 1.1)
        lines = [ln for ln in ax.get_lines() + twin.get_lines()
                 if not ln.get_label().startswith("_")]  # skip unlabelled mark lines
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left",
                  bbox_to_anchor=(1.08, 1.0), fontsize=8)


def plot_latency_distribution(
    latencies_ms: Sequence[float] | Mapping[str, Sequence[float]],
    *,
    title: str | None = None,
    model: str | None = None,
    device: str | None = None,
    bins: int = 30,
    figsize: tuple[float, float] = (9, 4.5),
) -> Figure:
    """Histogram of request latencies (ms) with p50/p95/p99 marked (numpy linear interpolation).
    Pass a mapping {series name: latencies} to compare runs on one chart."""
    series = dict(latencies_ms) if isinstance(latencies_ms, Mapping) else {"": latencies_ms}
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    all_values = np.concatenate([np.asarray(v, dtype=float) for v in series.values()] or [[]])
    all_values = all_values[np.isfinite(all_values)]
    if len(all_values) == 0:
        ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    edges = np.histogram_bin_edges(all_values, bins=bins) if len(all_values) else bins
    for i, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        color = f"C{i}"
        ax.hist(values, bins=edges, alpha=0.55 if len(series) > 1 else 0.8, color=color,
                label=f"{name} (n={len(values)})" if name else f"n={len(values)}")
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            p = float(np.percentile(values, q))
            ax.axvline(p, color=color, ls=style, lw=1.2,
                       label=f"{name + ' ' if name else ''}p{q} = {p:,.0f} ms")
    ax.set_xlabel("latency (send → full response), ms")
    ax.set_ylabel("requests")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.suptitle(_title("Latency distribution", model, device, title), fontsize=11)
    return fig


_SWEEP_KEYS = {
    "concurrency": ("concurrency",),
    "throughput": ("requests_per_second", "throughput_rps", "throughput", "rps"),
    "p50": ("p50_ms", "latency_p50_ms", "median_ms", "latency_ms_p50"),
    "p95": ("p95_ms", "latency_p95_ms", "latency_ms_p95"),
    "series": ("series", "mode", "label"),
}


def _pick(row: Mapping[str, Any], what: str, required: bool = True) -> Any:
    for key in _SWEEP_KEYS[what]:
        if row.get(key) is not None:
            return row[key]
    if required:
        raise KeyError(f"a concurrency-sweep row needs one of {_SWEEP_KEYS[what]} for {what}; "
                       f"this row has {sorted(row)}")
    return None


def plot_concurrency_sweep(
    rows: Iterable[Mapping[str, Any]],
    *,
    title: str | None = None,
    model: str | None = None,
    device: str | None = None,
    figsize: tuple[float, float] = (11, 4.5),
) -> Figure:
    """Throughput (requests/s) and latency (p50, p95 dashed; ms) against concurrency, one line
    per series. Each row is a dict with `concurrency`, a throughput (`requests_per_second`), a
    `p50_ms` and optionally `p95_ms` and `series` (e.g. "sequential" / "batched")."""
    groups: dict[str, list[tuple[float, float, float, float | None]]] = {}
    for row in rows:
        key = str(_pick(row, "series", required=False) or "")
        p95 = _pick(row, "p95", required=False)
        groups.setdefault(key, []).append((float(_pick(row, "concurrency")),
                                           float(_pick(row, "throughput")),
                                           float(_pick(row, "p50")),
                                           None if p95 is None else float(p95)))
    fig = Figure(figsize=figsize, layout="constrained")
    thr_ax, lat_ax = fig.subplots(1, 2)
    for i, (name, points) in enumerate(groups.items()):
        points.sort()
        c, thr, p50, p95 = zip(*points, strict=True)
        color, prefix = f"C{i}", f"{name}: " if name else ""
        thr_ax.plot(c, thr, "o-", color=color, label=name or None)
        lat_ax.plot(c, p50, "o-", color=color, label=f"{prefix}p50")
        if all(v is not None for v in p95):
            lat_ax.plot(c, p95, "s--", color=color, alpha=0.7, label=f"{prefix}p95")
    levels = sorted({p[0] for points in groups.values() for p in points})
    for ax in (thr_ax, lat_ax):
        ax.set_xticks(levels)
    thr_ax.set_xlabel("concurrency (requests in flight)")
    thr_ax.set_ylabel("throughput, requests/s")
    thr_ax.set_ylim(bottom=0)
    lat_ax.set_xlabel("concurrency (requests in flight)")
    lat_ax.set_ylabel("latency, ms")
    lat_ax.set_ylim(bottom=0)
    if any(groups):
        thr_ax.legend(fontsize=8)
    lat_ax.legend(fontsize=8)
    fig.suptitle(_title("Throughput and latency vs concurrency", model, device, title),
                 fontsize=11)
    return fig


def plot_server_state(
    frames: Mapping[str, Any],
    *,
    title: str | None = None,
    model: str | None = None,
    device: str | None = None,
    figsize: tuple[float, float] = (11, 6.5),
) -> Figure:
    """Several servers' own view over time, one line per server: requests waiting in the server,
    requests running, and (for those that have one) the share of the KV cache's pages in use.
    `frames` maps a name ("batched", "continuous") to a `UtilizationSampler.frame()` with the
    server's /stats columns (CPU mode, or `server_stats=True`); time counts from each frame's
    first sample."""
    fig = Figure(figsize=figsize, layout="constrained")
    waiting, running, kv = fig.subplots(3, 1, sharex=True)
    for i, (name, frame) in enumerate(frames.items()):
        x = np.asarray(frame["elapsed_s"], dtype=float)
        color = f"C{i}"
        for ax, col in ((waiting, "queue_depth"), (running, "in_flight")):
            values = _column(frame, col)
            if values is not None:
                ax.step(x, values, where="post", color=color, lw=1.2, label=name)
        used, total = _column(frame, "kv_pages_used"), _column(frame, "kv_pages_total")
        if used is not None and total is not None:
            share = 100 * used / total
            kv.step(x, share, where="post", color=color, lw=1.2,
                    label=f"{name}: peak {np.nanmax(share):.1f} % of {np.nanmax(total):,.0f} "
                          "pages")
    waiting.set_ylabel("waiting in the\nserver, requests")
    running.set_ylabel("running,\nrequests")
    kv.set_ylabel("KV cache pages\nin use, %")
    kv.set_xlabel("time since the first sample, s")
    for ax in (waiting, running, kv):
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**OUTSIDE)
    if not kv.lines:
        kv.text(0.5, 0.5, "no paged KV cache reported (only a continuous server has one)",
                ha="center", va="center", transform=kv.transAxes, fontsize=9)
    fig.suptitle(_title("What waits and what runs, from each server's /stats", model, device,
                        title), fontsize=11)
    return fig


# ------------------------------------------------------------------------------ rendering


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save(fig: Figure, path: str, dpi: int = 120) -> str:
    fig.savefig(path, dpi=dpi)
    return path


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _register_png_formatter() -> None:
    """Make a returned Figure display as a PNG in IPython even when pyplot was never imported."""
    ip = _ipython()
    if ip is not None:
        ip.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_register_png_formatter()


class LiveTimeline:
    """A timeline that redraws about once a second while something runs, in one notebook output.

    ::

        with LiveTimeline(sampler, model="model") as live:   # starts the sampler if needed
            result = live.watch(loadtest.run, url, concurrency=5, requests=50)
        live.figure                                          # the final figure

    Updates go through an IPython display handle (`display(..., display_id=True)` then
    `handle.update(...)`), so they appear live in JupyterLab, and the last one stays in the saved
    notebook under nbclient/nbval. `watch(fn)` runs fn in a worker thread and redraws from the
    calling thread; when fn returns a load test result, its requests are added to the sampler's
    marks (shaded). Inside a plain `with` block a background thread redraws instead. The final
    redraw always happens in the calling thread on exit. Outside IPython nothing is displayed;
    the final figure is still kept (and saved to `save_to` if given).

    Each redraw costs the process ~0.1-0.2 s of CPU; keep `refresh` around 1 s so a load test
    running in the same process is not slowed by its own monitor.
    """

    def __init__(
        self,
        sampler: UtilizationSampler,
        *,
        refresh: float = 1.0,
        model: str | None = None,
        title: str | None = None,
        requests: Callable[[], Any] | None = None,
        save_to: str | None = None,
        dpi: int = 90,
    ) -> None:
        self.sampler = sampler
        self.refresh = refresh
        self.model, self.title = model, title
        self.requests = requests  # optional callable returning request spans to shade live
        self.save_to = save_to
        self.dpi = dpi
        self.figure: Figure | None = None
        self.updates = 0
        self._handle = None
        self._owns_sampler = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._draw_lock = threading.Lock()

    def _marks(self) -> list[Mark]:
        marks = list(self.sampler.marks)
        if self.requests is not None:
            marks += [Mark(s, e, "request") for s, e in request_spans(self.requests())]
        return marks

    def update(self) -> Figure:
        """Redraw now from the samples so far."""
        with self._draw_lock:
            fig = plot_timeline(self.sampler.frame(), self._marks(), self.title, model=self.model)
            self.figure = fig
            if self._handle is not None:
                from IPython.display import Image

                self._handle.update(Image(data=figure_png(fig, self.dpi)))
            self.updates += 1
            return fig

    def __enter__(self) -> LiveTimeline:
        if not self.sampler.running:
            self.sampler.start()
            self._owns_sampler = True
        if _ipython() is not None:
            from IPython.display import Image, display

            fig = plot_timeline(self.sampler.frame(), self._marks(), self.title, model=self.model)
            self._handle = display(Image(data=figure_png(fig, self.dpi)), display_id=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="labkit-live", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                self.update()
            except Exception:  # a failed live redraw must not kill the run; exit redraws again
                pass

    def watch(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run fn(*args, **kwargs) in a worker thread, redrawing from this thread, and return
        its result (or raise its exception). A worker thread also has no running event loop, so
        asyncio-based load tests run there unchanged."""
        if self._thread is not None:  # we redraw from here; the background redraw can rest
            self._stop.set()
            self._thread.join()
            self._thread = None
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = fn(*args, **kwargs)
                outcome["returned_at"] = time.perf_counter()
            except BaseException as err:
                outcome["error"] = err

        worker = threading.Thread(target=target, name="labkit-watched", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(self.refresh)
            if worker.is_alive():
                self.update()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome.get("result")
        if getattr(result, "records", None):  # a load test: shade its requests from now on
            t0 = loadtest_t0(result, outcome["returned_at"])
            with contextlib.suppress(ValueError, TypeError):
                self.sampler.add_requests(result, t0=t0)
        return result

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owns_sampler:
            self.sampler.stop()
        self.update()  # the final figure, from the calling thread: it stays in the output
        if self.save_to:
            save(self.figure, self.save_to)
