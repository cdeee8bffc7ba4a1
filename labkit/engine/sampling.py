"""Token sampling for a batch: each row its own temperature, top-p and seed.

Greedy rows take the argmax. Sampled rows draw from the temperature-scaled distribution cut to
the top-p nucleus, by inverse CDF at one uniform number per row, drawn on the host from that
row's own `random.Random`: one small copy per step instead of a kernel per row, and a seed gives
the same draws on any device and whatever else shares the batch.
"""

from __future__ import annotations

import random

import torch

from labkit.engine.runner import to_device


def uniforms(rngs: list[random.Random | None], device: torch.device) -> torch.Tensor | None:
    """One uniform draw per row from that row's own generator (0 for greedy rows), or None when
    every row is greedy. Drawn on the host: one small copy per step instead of a kernel per row,
    and a seed gives the same draws on any device and whatever else shares the batch."""
    if all(rng is None for rng in rngs):
        return None
    return to_device([0.0 if rng is None else rng.random() for rng in rngs], device,
                     torch.float32)


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 uniform: torch.Tensor | None) -> torch.Tensor:
    """Next token of each row: argmax where temperature is 0, else a draw from the row's
    temperature-scaled distribution cut to its top-p nucleus, by inverse CDF at `uniform`."""
    logits = logits.float()  # as `generate` does, whatever the model's dtype
    greedy = logits.argmax(-1)
    if uniform is None:
        return greedy
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs, order = torch.softmax(logits / scale[:, None], -1).sort(-1, descending=True)
    # Nucleus: keep the most likely tokens until their mass reaches top_p (the first always).
    outside = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    cdf = probs.masked_fill(outside, 0).cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def hold_stop_tokens(logits: torch.Tensor, rows: list[int], stop_ids: set[int]) -> None:
    """Forbid the stop tokens in `rows` (in place): requests whose `min_tokens` is not reached
    yet, or that `ignore_eos`."""
    if rows and stop_ids:
        device = logits.device
        logits[to_device(rows, device)[:, None],
               to_device(sorted(stop_ids), device)] = float("-inf")
