"""Does `labkit monitor` agree with `nvidia-smi dmon`? Both run side by side during a load.

Starts `labkit serve` (default synthetic:llama-3.2-3b), keeps it busy with a closed-loop load
(2 clients, 150-token requests), then runs at the same moment, for --count seconds:

    labkit monitor --count 20 --interval 1 --csv ...
    nvidia-smi dmon -s u -c 20

and prints both per-second utilization series and their means. Both read the same NVML counter
(utilization.gpu: share of the driver's sample period in which any kernel ran; dmon's "sm"
column) at unsynchronised moments, so single seconds differ; the means should agree within a
few points (the script calls a difference of <= --tolerance points agreement).

    PYTHONPATH=. python3 benchmarks/monitor_vs_dmon.py [--count 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labkit.serve.launcher import launch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:llama-3.2-3b")
    p.add_argument("--count", type=int, default=20, help="seconds (samples) for both tools")
    # 2 clients keep a one-at-a-time server always busy (one generating, one queued), and
    # leave little queued work to drain when the comparison ends
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=150)
    p.add_argument("--warm", type=float, default=3.0, help="seconds of load before measuring")
    p.add_argument("--tolerance", type=float, default=5.0, help="percentage points")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="write the series and means here")
    return p.parse_args(argv)


class Load:
    """Closed-loop clients posting /generate until stopped (the load is the point here, not
    its latencies: labkit loadtest measures those)."""

    def __init__(self, url: str, clients: int, max_tokens: int) -> None:
        self.url = url.rstrip("/") + "/generate"
        self.body = json.dumps({"prompt": "Suggest a skincare routine for dry skin",
                                "max_tokens": max_tokens}).encode()
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True)
                        for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(self.url, self.body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    response.read()
                self.done += 1
            except OSError as err:
                self.errors.append(str(err))
                time.sleep(0.5)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # clients finish their current request; daemons, so nobody waits
        for t in self.threads:
            t.join(timeout=0.1)


def parse_dmon(text: str) -> list[float | None]:
    """The 'sm' column (utilization.gpu) of `nvidia-smi dmon -s u` output, GPU 0."""
    columns: list[str] = []
    values: list[float | None] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "#":
            if len(parts) > 1 and parts[1] == "gpu":  # not the "# Idx % % ..." units line
                columns = parts[1:]
            continue
        if columns and len(parts) == len(columns) and "sm" in columns:
            cell = parts[columns.index("sm")]
            values.append(None if cell == "-" else float(cell))
    return values


def read_monitor_csv(path: Path) -> list[float | None]:
    with path.open() as f:
        return [float(r["gpu_util"]) if r["gpu_util"] else None for r in csv.DictReader(f)]


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi is not on PATH: this comparison needs an NVIDIA GPU machine",
              file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    limit = args.count + 60
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "monitor.csv"
        print(f"starting labkit serve --model {args.model} ...", flush=True)
        with launch(model=args.model, port=None, timeout=args.startup_timeout) as srv, \
                Load(srv.url, args.concurrency, args.max_tokens) as load:
            print(f"server at {srv.url}; {args.concurrency} clients; warming {args.warm:g} s",
                  flush=True)
            time.sleep(args.warm)
            monitor = subprocess.Popen(
                [sys.executable, "-m", "labkit", "monitor", "--count", str(args.count),
                 "--interval", "1", "--csv", str(csv_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
            dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-c", str(args.count),
                                     "-i", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                monitor_out, _ = monitor.communicate(timeout=limit)
                dmon_out, _ = dmon.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                monitor.kill()
                dmon.kill()
                print(f"a monitor did not finish within {limit} s", file=sys.stderr)
                return 1
            print(f"load: {load.done} requests completed, {len(load.errors)} errors", flush=True)
        if monitor.returncode != 0 or dmon.returncode != 0:
            print(f"labkit monitor exited {monitor.returncode}:\n{monitor_out}\n"
                  f"nvidia-smi dmon exited {dmon.returncode}:\n{dmon_out}", file=sys.stderr)
            return 1
        ours = read_monitor_csv(csv_path)
    theirs = parse_dmon(dmon_out)

    print(f"\n{'second':>6} {'labkit monitor %':>17} {'nvidia-smi dmon %':>18}")
    for i in range(max(len(ours), len(theirs))):
        a = ours[i] if i < len(ours) else None
        b = theirs[i] if i < len(theirs) else None
        print(f"{i + 1:>6} {'-' if a is None else f'{a:.0f}':>17} "
              f"{'-' if b is None else f'{b:.0f}':>18}")
    m_ours, m_theirs = mean(ours), mean(theirs)
    if m_ours is None or m_theirs is None:
        print(f"missing values: labkit {len(ours)} samples, dmon {len(theirs)} samples\n"
              f"--- dmon output ---\n{dmon_out}", file=sys.stderr)
        return 1
    diff = m_ours - m_theirs
    agree = abs(diff) <= args.tolerance
    print(f"\nmean utilization.gpu over {args.count} s during the load ({args.model}):")
    print(f"  labkit monitor   {m_ours:5.1f} %  ({len(ours)} samples)")
    print(f"  nvidia-smi dmon  {m_theirs:5.1f} %  ({len(theirs)} samples)")
    print(f"  difference       {diff:+5.1f} points: "
          f"{'agree' if agree else 'DISAGREE'} (tolerance {args.tolerance:g} points)")
    print("\n--- labkit monitor output ---\n" + monitor_out.rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "count": args.count, "labkit_monitor": ours, "dmon_sm": theirs,
            "labkit_mean": m_ours, "dmon_mean": m_theirs, "difference": diff, "agree": agree,
            "monitor_output": monitor_out, "dmon_output": dmon_out}, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
