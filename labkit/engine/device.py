"""Where the engine runs: host values on the device without waiting for it (what every step's
small inputs need), and the CPU threads torch may use."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the GPU. `torch.tensor(values,
    device="cuda")` copies from pageable memory and then synchronizes the stream: the host would
    wait for the step in flight to end, and the GPU would idle while the host prepares the next.
    From pinned memory the copy is queued behind that step instead."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def set_cpu_threads(device_type: str, threads: int | None) -> None:
    """CPU generation: leave one core to the event loop, the notebook's kernel or a load tester
    on the same machine. torch's default (one thread per core) spin-waits against them: on a
    loaded 2-core machine, 2 threads ran many times slower than 1 (benchmarks/RESULTS.md,
    "Embedded model on the CPU"). An explicit `threads` always wins; without one the count only
    goes down (to the cores this process may use, less one), so a second call changes nothing
    and a lower count set before is kept. On a GPU the default is left alone."""
    if threads is None and device_type != "cpu":
        return
    current = torch.get_num_threads()
    chosen = threads or min(current, max(1, _usable_cores() - 1))
    if chosen != current:
        torch.set_num_threads(chosen)
        log.info("CPU threads for generation: %d (of %d cores; --threads to change)", chosen,
                 _usable_cores())


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: what this process may run on (containers)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
