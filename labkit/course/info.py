"""`labkit info`: what this machine has for the lab."""

from __future__ import annotations

import argparse
import json

from labkit.engine.model import describe_default_model
from labkit.measure import gpu


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run_cli(args) -> int:
    info = gpu.device_info()
    info["default_model"] = describe_default_model()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(gpu.describe(info))
    rows = [
        ("device", info["device"]),
        ("GPUs", info["gpu_count"]),
        ("driver", info["driver_version"] or "no NVIDIA driver found"),
        ("CUDA (torch build)", info["cuda_version"] or "CPU-only torch build"),
        ("torch", info["pytorch_version"]),
        ("NVML", "available" if info["nvml_available"] else "not available (no GPU monitoring)"),
    ]
    mem = info["memory"]
    rows.append(("GPU memory", f"{mem['used_gb']:.1f} of {mem['total_gb']:.1f} GB used"
                 if mem else "no GPU"))
    rows.append(("model/", info["default_model"]))
    for name, value in rows:
        print(f"  {name:<20} {value}")
    return 0
