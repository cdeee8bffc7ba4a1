"""The memory-bandwidth floor of decoding: each new token reads every weight once, so one decode
step can't be faster than weight bytes ÷ memory bandwidth. Bandwidth is measured, not looked up."""

from __future__ import annotations

import time

import torch


def measure_copy_bandwidth(device: torch.device | str, size_mb: int = 1024, repeats: int = 10
                           ) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    device = torch.device(device)
    n = size_mb * 1024 * 1024 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    elapsed = time.perf_counter() - started
    return 2 * src.numel() * src.element_size() * repeats / elapsed


def decode_floor_ms(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Fastest possible ms per token at batch 1: every weight byte read once per step."""
    return weight_bytes / bandwidth_bytes_per_s * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
