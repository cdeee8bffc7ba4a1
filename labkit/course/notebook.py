"""Small helpers the notebooks share: parameters from the environment, the default model,
and the results file later notebooks read. CI sets LABKIT_* variables to run in fast mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from labkit.engine.model import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
GPU_DEFAULT = "synthetic:llama-3.2-3b"


def param(name: str, default, ci=None):
    """`LABKIT_<NAME>` from the environment, converted to the type of `default`; else `ci` in
    fast mode (LABKIT_CI=1) when given; else `default`."""
    raw = os.environ.get(f"LABKIT_{name.upper()}")
    if raw is None:
        return ci if ci is not None and fast_mode() else default
    if isinstance(default, bool):
        return raw.lower() in {"1", "true", "yes"}
    if isinstance(default, (list, tuple)):
        return [type(default[0])(x) for x in raw.split(",")] if default else raw.split(",")
    return type(default)(raw)


def fast_mode() -> bool:
    """True under CI (LABKIT_CI=1): small request counts, short waits."""
    return os.environ.get("LABKIT_CI", "").lower() in {"1", "true", "yes"}


def default_model() -> str:
    """On a GPU: a model you downloaded (downloads/), else synthetic:llama-3.2-3b, which has
    the seed's 3B memory and timing. On a CPU: the embedded model in model/."""
    if os.environ.get("LABKIT_MODEL"):
        return os.environ["LABKIT_MODEL"]
    if not torch.cuda.is_available():
        return "model"
    downloads = sorted((REPO_ROOT / "downloads").glob("*/config.json"))
    return str(downloads[0].parent) if downloads else GPU_DEFAULT


def save_results(name: str, values: dict) -> Path:
    """Write results/<name>.json (git-ignored) for later notebooks."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(values, indent=2, default=str))
    return path


def load_results(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def banner(model: str | None = None) -> str:
    """Where and when this notebook's numbers were measured (printed by each parameters cell)."""
    import datetime

    from labkit.measure import gpu

    info = gpu.device_info()
    machine = (f"{info['gpu_name']} (driver {info['driver_version']}, CUDA {info['cuda_version']})"
               if info["gpu_name"] else "CPU only (no GPU)")
    text = (f"Measured on {machine}, torch {info['pytorch_version']}"
            + (f", model {model}" if model else "")
            + f", {datetime.date.today().isoformat()}" + (" [CI fast mode]" if fast_mode() else ""))
    print(text)
    return text


# Recorded in benchmarks/RESULTS.md ("H100 runs", notebook 02): a device-to-device copy.
RECORDED_COPY_BANDWIDTH = (3.00e12, "recorded on an NVIDIA H100 80GB HBM3 (benchmarks/RESULTS.md, "
                                    "H100 runs, notebook 02)")


def gpu_copy_bandwidth() -> tuple[float, str]:
    """A GPU's copy bandwidth (bytes/s) and where it comes from: your own notebook 02 run when
    it ran on a GPU (results/single_inference.json), else the figure recorded in
    benchmarks/RESULTS.md."""
    mine = load_results("single_inference")
    if mine and str(mine.get("device", "")).startswith("cuda") and mine.get("bandwidth_tb_s"):
        return mine["bandwidth_tb_s"] * 1e12, f"measured by your notebook 02 on {mine['device']}"
    return RECORDED_COPY_BANDWIDTH
