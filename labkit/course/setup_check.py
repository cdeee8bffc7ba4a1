"""The seed's "Quick Verification" and troubleshooting, automated: one ✅/⚠️ line per check,
with the fix next to anything that is not right."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from labkit.engine.model import ModelSourceError, default_model_dir, resolve_local_path
from labkit.measure import gpu

MIN_DRIVER = 520  # the seed asks for 520+
MIN_FREE_DISK_GB = 10


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "✅" if self.ok else "⚠️"
        text = f"{mark} {self.name:<12} {self.detail}"
        return text if self.ok else f"{text}\n   fix: {self.fix}"


def check_gpu() -> Check:
    if torch.cuda.is_available():
        return Check("GPU", True, f"{torch.cuda.get_device_name(0)} "
                     f"({torch.cuda.device_count()} visible)")
    return Check("GPU", False, "no CUDA GPU visible to torch: the lab runs in CPU mode",
                 "on a GPU box, check `nvidia-smi`; in Docker run with `--gpus all` and the "
                 "NVIDIA Container Toolkit; a CPU-only torch build also hides the GPU")


def check_driver() -> Check:
    version = gpu.driver_version()
    if version is None:
        return Check("driver", False, "no NVIDIA driver found (NVML cannot start)",
                     "install the NVIDIA driver (520+) and check `nvidia-smi`")
    major = int(version.split(".")[0])
    return Check("driver", major >= MIN_DRIVER, version,
                 f"the driver is older than {MIN_DRIVER}: upgrade it")


def check_cuda() -> Check:
    if torch.version.cuda is None:
        return Check("CUDA", False, f"torch {torch.__version__} is a CPU-only build",
                     "on a GPU machine, reinstall torch from PyPI (its Linux wheels use CUDA)")
    return Check("CUDA", True, f"torch built for CUDA {torch.version.cuda}")


def check_torch() -> Check:
    return Check("torch", True, torch.__version__)


def check_nvml() -> Check:
    if gpu.nvml() is None:
        return Check("NVML", False, "not available: no GPU utilization timeline",
                     "NVML comes with the NVIDIA driver; without a GPU, labkit samples the "
                     "server's busy time instead and labels it CPU mode")
    return Check("NVML", True, "available (GPU utilization can be sampled)")


def check_disk(path: str = ".") -> Check:
    free_gb = shutil.disk_usage(path).free / 1e9
    return Check("disk", free_gb >= MIN_FREE_DISK_GB, f"{free_gb:.0f} GB free",
                 f"a downloaded 3B model needs ~7 GB: free at least {MIN_FREE_DISK_GB} GB")


def check_model() -> Check:
    try:
        path = resolve_local_path("model")
    except ModelSourceError as err:
        return Check("model", False, str(err), "restore model/ with `git checkout model/` "
                     "or rebuild it with `make model`")
    size_mb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    return Check("model", True, f"embedded model in {default_model_dir()} ({size_mb:.1f} MB)")


def run_checks() -> list[Check]:
    return [check() for check in (check_gpu, check_driver, check_cuda, check_torch, check_nvml,
                                  check_disk, check_model)]


def report(checks: list[Check] | None = None) -> str:
    checks = checks if checks is not None else run_checks()
    lines = [c.line() for c in checks]
    gpu_ok = checks[0].ok
    lines.append("")
    lines.append("GPU mode: every number in the lab is measured on this GPU." if gpu_ok else
                 "CPU mode: no GPU here. Every notebook still runs; timings are CPU timings and "
                 "the timeline shows the server's busy time, labelled as such.")
    return "\n".join(lines)
