"""`labkit monitor`: one line per sample, like `nvidia-smi dmon`, but 10 times a second and with
NVML GPM activity (Hopper and newer); a summary on exit (Ctrl-C or --count).

Columns: gpu % = NVML utilization.gpu (share of the driver's sample period in which any kernel
ran; dmon's "sm"), mem % = share in which device memory was read or written (dmon's "mem"),
then memory used (GB), power (W), SM clock (MHz), and where GPM exists SM activity, tensor
activity and DRAM bandwidth (% of the chip's capacity). "-" marks a metric the GPU did not give.

Without a GPU, `--url` of a running labkit server records its inference worker's busy % instead,
labelled as CPU mode: it is not GPU utilization.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from typing import IO, Any

from labkit.measure.utilization import (
    CPU_MODE_LABEL,
    IDLE_THRESHOLD_PCT,
    NoGpuError,
    UtilizationSampler,
    Value,
)

# (column, header, unit, width, decimals)
NVML_COLUMNS = [
    ("gpu_util", "gpu", "%", 5, 0),
    ("mem_util", "mem", "%", 5, 0),
    ("mem_used_gb", "used", "GB", 7, 2),
    ("power_w", "pwr", "W", 7, 1),
    ("sm_clock_mhz", "sm-clk", "MHz", 7, 0),
]
GPM_COLUMNS = [
    ("sm_activity", "sm-act", "%", 7, 1),
    ("tensor_activity", "tensor", "%", 7, 1),
    ("dram_bw", "dram", "%", 6, 1),
]
CPU_COLUMNS = [
    ("busy_pct", "busy", "%", 6, 0),
    ("queue_depth", "queue", "req", 6, 0),
    ("in_flight", "flight", "req", 7, 0),
    ("requests_served", "served", "req", 7, 0),
]


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between samples (default 0.1; GPM needs >= 0.1)")
    parser.add_argument("--count", type=int, default=None,
                        help="stop after N samples (default: until Ctrl-C)")
    parser.add_argument("--csv", metavar="FILE", help="also write every sample to a CSV file")
    parser.add_argument("--device", type=int, default=0, help="GPU index (default 0)")
    parser.add_argument("--url", metavar="SERVER_URL",
                        help="without a GPU: a labkit server to poll for its busy %% (CPU mode)")


def table_columns(sampler: UtilizationSampler) -> list[tuple[str, str, str, int, int]]:
    if sampler.source == "cpu-mode":
        return CPU_COLUMNS
    present = set(sampler.reader.columns)
    return [c for c in NVML_COLUMNS + GPM_COLUMNS if c[0] in present]


def header(sampler: UtilizationSampler) -> list[str]:
    cols = table_columns(sampler)
    what = CPU_MODE_LABEL if sampler.source == "cpu-mode" else "NVML"
    lines = [f"# labkit monitor: {sampler.device_name} ({what}), every {sampler.interval:g} s"]
    if sampler.source == "nvml" and not any(c[0] == "sm_activity" for c in cols):
        status = getattr(sampler.reader, "gpm_status", "not available")
        lines.append(f"# SM/tensor/DRAM activity: GPM {status}")
    lines.append("# " + f"{'time':>7}" + "".join(f"{c[1]:>{c[3]}}" for c in cols))
    lines.append("# " + f"{'s':>7}" + "".join(f"{c[2]:>{c[3]}}" for c in cols))
    return lines


def format_row(sampler: UtilizationSampler, row: dict[str, Value]) -> str:
    elapsed = row["time"] - (sampler.t0 or row["time"])
    cells = []
    for col, _, _, width, decimals in table_columns(sampler):
        value = row.get(col)
        cells.append(f"{'-' if value is None else f'{value:.{decimals}f}':>{width}}")
    decimals = 1 if sampler.interval >= 0.1 else 2
    return "  " + f"{elapsed:7.{decimals}f}" + "".join(cells)


def summary_lines(sampler: UtilizationSampler) -> list[str]:
    s = sampler.summary()
    if not s["samples"]:
        return ["# no samples"]
    what = "worker busy (CPU mode, not GPU utilization)" if s["source"] == "cpu-mode" \
        else "GPU utilization"
    lines = [f"# {s['samples']} samples over {s['duration_s']:.1f} s"]
    if s["mean_util"] is None:
        lines.append(f"# mean {what}: no values")
    else:
        lines.append(f"# mean {what}: {s['mean_util']:.1f} %   peak {s['peak_util']:.0f} %   "
                     f"idle: {s['idle_fraction']:.1%} of samples under {IDLE_THRESHOLD_PCT:g} %")
    if s["source"] == "nvml":
        sm = s.get("sm_activity_mean")
        lines.append("# mean SM activity: " + (f"{sm:.1f} %" if sm is not None else
                     f"not available (GPM {getattr(sampler.reader, 'gpm_status', '')})"))
    return lines


def monitor(sampler: UtilizationSampler, count: int | None = None, out: IO[str] | None = None,
            csv_path: str | None = None) -> dict[str, Any]:
    """Sample in this thread, printing each row; on Ctrl-C or after `count`, print and return
    the summary. Sampling here (not in a background thread) keeps the lines in order."""
    out = out or sys.stdout
    csv_file = open(csv_path, "w", newline="") if csv_path else None  # noqa: SIM115
    writer = None
    if csv_file is not None:
        fields = ["time", "elapsed_s", "wall_time", *sampler.reader.columns]
        writer = csv.DictWriter(csv_file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
    for line in header(sampler):
        print(line, file=out, flush=True)
    n = 0
    next_t = time.perf_counter()
    try:
        while count is None or n < count:
            row = sampler.sample_once()
            n += 1
            print(format_row(sampler, row), file=out, flush=True)
            if writer is not None:
                writer.writerow({**{k: "" if v is None else v for k, v in row.items()},
                                 "elapsed_s": row["time"] - sampler.t0,
                                 "wall_time": row["time"] + sampler.wall_offset})
                csv_file.flush()  # a Ctrl-C leaves a complete file
            if count is not None and n >= count:
                break
            next_t = max(next_t + sampler.interval, time.perf_counter())
            time.sleep(max(0.0, next_t - time.perf_counter()))
    except KeyboardInterrupt:
        print(file=out)
    finally:
        if csv_file is not None:
            csv_file.close()
    for line in summary_lines(sampler):
        print(line, file=out, flush=True)
    return sampler.summary()


def run_cli(args) -> int:
    if args.interval <= 0:
        print("labkit monitor: --interval must be > 0 seconds", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("labkit monitor: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        sampler = UtilizationSampler(interval=args.interval, device=args.device, url=args.url)
    except NoGpuError as err:
        print(f"labkit monitor: {err}", file=sys.stderr)
        return 1
    except ConnectionError as err:
        print(f"labkit monitor: {err}", file=sys.stderr)
        return 1
    try:
        monitor(sampler, args.count, csv_path=args.csv)
    except OSError as err:  # the CSV file could not be written
        print(f"labkit monitor: cannot write {args.csv}: {err.strerror or err}", file=sys.stderr)
        return 1
    finally:
        sampler.close()
    return 0
