"""Token sampling for a batch: each row its own temperature, top-p and seed, without a sort.

Greedy rows take the argmax. A sampled row draws from p, its distribution at its temperature;
with top_p < 1, from p cut to the nucleus N (the most likely tokens, up to mass top_p) and
renormalised, as `generate` does. Finding N by sorting the vocabulary of every row made a
sampled step 1.3-1.8x a greedy one (benchmarks/RESULTS.md, "Sampling"). Here nothing is sorted:

- a draw from p takes one pass over the vocabulary: on CUDA the Gumbel-max trick (the argmax
  of the scaled logits plus Gumbel noise, `labkit.engine.sample_kernel`), elsewhere the inverse
  CDF in vocabulary order;
- top_p < 1 is rejection sampling with a rising pivot (as FlashInfer's top-p sampling): draw t
  from p among the tokens above the pivot; t is in N when the mass of the tokens more likely
  than t is under top_p, and is kept; else no token as likely as t can be in N, t's probability
  becomes the pivot and the row draws again. A kept draw follows p cut to N exactly; the first
  one is kept with probability at least top_p.

A row's randomness is a 32-bit seed per step, drawn on the host from the request's own
`random.Random`: a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import logging
import random

import torch

from labkit.engine.device import to_device

log = logging.getLogger(__name__)
MAX_ROUNDS = 32  # rejection rounds before a row settles for its most likely token (in N)
_M32 = 0xFFFFFFFF


def step_seeds(rngs: list[random.Random | None], device: torch.device) -> torch.Tensor | None:
    """This step's seed of each row (0 for greedy rows), or None when every row is greedy."""
    if all(rng is None for rng in rngs):
        return None
    return to_device([0 if rng is None else rng.getrandbits(31) for rng in rngs], device,
                     torch.int64)


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor | None) -> torch.Tensor:
    """Next token of each row: argmax where temperature is 0, else a draw from the row's
    temperature-scaled distribution cut to its top-p nucleus, from the row's seed."""
    if seeds is None:
        return logits.argmax(-1)
    if logits.is_cuda and _kernel_usable():
        from labkit.engine import sample_kernel

        try:
            return sample_kernel.sample(logits, temperature, top_p, seeds)
        except Exception as err:  # a Triton that cannot build it: the eager path is exact too
            _KERNEL_BROKEN.append(err)
            log.warning("The sampling kernel failed (%s: %s); sampling on the eager path from "
                        "now on", type(err).__name__, err)
    return _sample_eager(logits, temperature, top_p, seeds)


_KERNEL_BROKEN: list[BaseException] = []


def _kernel_usable() -> bool:
    from labkit.engine import sample_kernel

    return sample_kernel.available() and not _KERNEL_BROKEN


def _sample_eager(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor) -> torch.Tensor:
    """The CPU's way: inverse CDF in vocabulary order, one uniform per row and round."""
    logits = logits.float()  # as `generate` does, whatever the model's dtype
    greedy = logits.argmax(-1)
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / scale[:, None], -1)
    rows = torch.arange(len(probs), device=probs.device)
    chosen, pivot = greedy.clone(), torch.full_like(temperature, -1.0)
    open_ = temperature > 0
    for round_ in range(MAX_ROUNDS):
        if not open_.any():
            break
        cdf = torch.where(probs > pivot[:, None], probs, 0.0).cumsum(-1)
        target = uniform(seeds, round_).to(cdf.device) * cdf[:, -1]
        draw = torch.searchsorted(cdf, target[:, None]).squeeze(-1).clamp(max=cdf.shape[1] - 1)
        p_draw = probs[rows, draw]
        above = torch.where(probs > p_draw[:, None], probs, 0.0).sum(-1)
        kept = open_ & ((top_p >= 1) | (above < top_p))
        chosen = torch.where(kept, draw, chosen)
        open_ &= ~kept
        pivot = torch.where(open_, p_draw, pivot)
    return chosen


def uniform(seeds: torch.Tensor, round_: int) -> torch.Tensor:
    """A uniform number in (0, 1) per row from its seed and the round (a counter-based hash:
    lowbias32, C. Wellons), 24 bits of it."""
    x = (seeds.to(torch.int64) ^ _lowbias32(round_ * 0x9E3779B9 + 0x6A09E667)) & _M32
    x = _lowbias32(x)
    return ((x >> 8).to(torch.float32) + 0.5) / 2**24


def _lowbias32(x):
    """Works on Python ints and int64 tensors alike: 32-bit arithmetic by masking."""
    x = (x ^ (x >> 16)) & _M32
    x = (x * 0x7FEB352D) & _M32
    x = (x ^ (x >> 15)) & _M32
    x = (x * 0x846CA68B) & _M32
    return (x ^ (x >> 16)) & _M32


def hold_stop_tokens(logits: torch.Tensor, rows: list[int], stop_ids: set[int]) -> None:
    """Forbid the stop tokens in `rows` (in place): requests whose `min_tokens` is not reached
    yet, or that `ignore_eos`."""
    if rows and stop_ids:
        device = logits.device
        logits[to_device(rows, device)[:, None],
               to_device(sorted(stop_ids), device)] = float("-inf")
