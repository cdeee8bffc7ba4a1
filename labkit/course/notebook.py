"""Small helpers the notebooks share: parameters from the environment, the default model,
the results file later notebooks read, and the GPU reference a CPU run is printed beside.
CI sets LABKIT_* variables to run in fast mode.

The GPU reference: `make gpu-outputs` (nbrun) runs the notebooks on a GPU with
LABKIT_SAVE_REFERENCE=1, so each `save_results` there also writes
notebooks/reference/<name>.json, committed, with the card, driver, date and model it was
measured with. A learner's run without a GPU prints it beside its own figures
(`print_gpu_reference`), so both are on the screen and neither overwrites the other."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from labkit.engine.model import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
REFERENCE_DIR = REPO_ROOT / "notebooks" / "reference"
SAVE_REFERENCE_ENV = "LABKIT_SAVE_REFERENCE"
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


def save_results(name: str, values: dict, model: str | None = None) -> Path:
    """Write results/<name>.json (git-ignored) for later notebooks, with where it was measured
    (`measured_on`). On a GPU under LABKIT_SAVE_REFERENCE=1 (`make gpu-outputs`), also the
    committed GPU reference notebooks/reference/<name>.json."""
    record = {**values, "measured_on": measured_on(model or values.get("model"))}
    text = json.dumps(record, indent=2, default=str)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(text)
    if os.environ.get(SAVE_REFERENCE_ENV) == "1" and torch.cuda.is_available():
        REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
        (REFERENCE_DIR / f"{name}.json").write_text(text + "\n")
    return path


def load_results(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def gpu_reference(name: str) -> dict | None:
    """The committed GPU run's results for `name` (notebooks/reference/<name>.json), if any."""
    path = REFERENCE_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def print_gpu_reference(name: str, render: Callable[[list], str]) -> None:
    """Without a GPU: print the committed GPU run's table beside the one just measured,
    `render` applied to its "rows" (or to the whole record, for one without rows), under the
    card, driver, date and model it came from.
    On a GPU the notebook's own figures are the GPU's: nothing is printed. (Returns nothing: a
    notebook cell ending with it displays no value.)"""
    if torch.cuda.is_available():
        return
    reference = gpu_reference(name)
    if reference is None:
        print(f"(No GPU reference is committed for this table: notebooks/reference/{name}.json "
              "is written by `make gpu-outputs` on a GPU machine.)")
        return
    print(f"\nGPU reference, for comparison: {describe_measured_on(reference['measured_on'])} "
          f"(notebooks/reference/{name}.json, committed; not measured here)")
    print(render(reference["rows"] if "rows" in reference else reference))


def measured_on(model: str | None = None) -> dict:
    """The machine, software, date and model behind a notebook's numbers."""
    import datetime

    from labkit.measure import gpu

    info = gpu.device_info()
    return {"card": info["gpu_name"] or "CPU only (no GPU)",
            "driver": info["driver_version"], "cuda": info["cuda_version"],
            "torch": info["pytorch_version"], "model": model,
            "date": datetime.date.today().isoformat(), "fast_mode": fast_mode()}


def describe_measured_on(where: dict) -> str:
    machine = (f"{where['card']} (driver {where['driver']}, CUDA {where['cuda']})"
               if where.get("driver") else where["card"])
    return (f"{machine}, torch {where['torch']}"
            + (f", model {where['model']}" if where.get("model") else "")
            + f", {where['date']}" + (" [CI fast mode]" if where.get("fast_mode") else ""))


def banner(model: str | None = None) -> str:
    """Where and when this notebook's numbers were measured (printed by each parameters cell)."""
    text = "Measured on " + describe_measured_on(measured_on(model))
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
