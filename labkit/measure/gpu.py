"""What GPU is here: name, count, driver, CUDA, torch, memory. Honest on a CPU-only machine.

torch is imported inside the functions that need it, so `labkit monitor` and the utilization
sampler (`labkit.measure.utilization`) start without paying for a torch import.
"""

from __future__ import annotations

import functools

GB = 1e9


@functools.lru_cache(maxsize=1)
def nvml():
    """The initialised `pynvml` module (from nvidia-ml-py), or None when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVML here"
        return None


def driver_version() -> str | None:
    lib = nvml()
    if lib is None:
        return None
    version = lib.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else version


def memory_gb(index: int = 0) -> dict | None:
    """torch's allocated/reserved and the card's total/free memory in GB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(index)
    return {
        "allocated_gb": round(torch.cuda.memory_allocated(index) / GB, 3),
        "reserved_gb": round(torch.cuda.memory_reserved(index) / GB, 3),
        "total_gb": round(total / GB, 3),
        "free_gb": round(free / GB, 3),
        "used_gb": round((total - free) / GB, 3),
    }


def device_info(index: int = 0, memory: bool = True) -> dict:
    """The seed's /stats fields. Without a GPU: gpu_name None, gpu_count 0, device 'cpu'.
    `memory=False` leaves out the memory reading (None), which would open a CUDA context in
    this process."""
    import torch

    has_cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if has_cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(index) if has_cuda else None,
        "gpu_count": torch.cuda.device_count() if has_cuda else 0,
        "driver_version": driver_version(),
        "cuda_version": torch.version.cuda,
        "pytorch_version": torch.__version__,
        "nvml_available": nvml() is not None,
        "memory": memory_gb(index) if memory else None,
    }


def describe(info: dict | None = None) -> str:
    """One line for logs: 'GPU: NVIDIA H100 80GB HBM3' or a plain 'No GPU detected'."""
    info = info or device_info()
    if info["gpu_name"] is None:
        return "No GPU detected: running on the CPU (timings are CPU timings, not GPU ones)"
    return f"GPU: {info['gpu_name']}"
