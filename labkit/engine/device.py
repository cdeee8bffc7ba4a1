"""Host values on the device without waiting for it: what every step's small inputs need."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the GPU. `torch.tensor(values,
    device="cuda")` copies from pageable memory and then synchronizes the stream: the host would
    wait for the step in flight to end, and the GPU would idle while the host prepares the next.
    From pinned memory the copy is queued behind that step instead."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
