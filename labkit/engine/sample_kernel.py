"""`labkit.engine.sampling`'s draw on CUDA: one Triton program per row, reading the row's logits
in their own dtype, a few passes over the vocabulary and no sort.

    temperature 0   argmax (the first of equal maxima, as torch.argmax)
    top_p 1         argmax of logits / temperature + Gumbel noise: one pass
    top_p < 1       that pass (it finds the likeliest token too), then one for the mass of all
                    tokens and of those more likely than the draw: the draw is kept when that
                    is under top_p of all; else it is the pivot, and each further round draws
                    among the tokens above it (a pass) and weighs the new draw (a pass)

Gumbel noise is -log(-log(u)) of uniforms hashed from the row's seed, the round and the token's
index. A custom op, so CUDA graphs capture it and torch.compile calls it as is.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: sampling runs its eager path
    triton = None

BLOCK = 2048
SMALL_BATCH = 64  # below this many rows, each program takes a larger block with more warps
MAX_ROUNDS = 32  # as labkit.engine.sampling.MAX_ROUNDS


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _uniform(key, index):
        """A uniform number in (0, 1) per index, from a 32-bit key: the lowbias32 hash (C.
        Wellons) of key ^ golden-ratio × index, in int32 (wrapping products, masked shifts).
        Cheaper than Philox (`tl.rand`), which made the draw's pass compute-bound."""
        x = key ^ (index * -1640531527)  # 0x9E3779B9
        x ^= (x >> 16) & 0xFFFF
        x *= 0x7FEB352D
        x ^= (x >> 15) & 0x1FFFF
        x *= -2073254261  # 0x846CA68B
        x ^= (x >> 16) & 0xFFFF
        return ((x >> 8) & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216) + (0.5 / 16777216)

    @triton.jit
    def _round_key(seed, round_):
        x = seed ^ (round_ * 0x2545F491)
        x ^= (x >> 16) & 0xFFFF
        x *= 0x7FEB352D
        x ^= (x >> 15) & 0x1FFFF
        return x

    @triton.jit
    def _draw_pass(row_ptr, vocab, inv_t, key, pivot, BLOCK: tl.constexpr,
                   NOISE: tl.constexpr):
        """(the draw, the most likely token): the argmax of logit × inv_t plus Gumbel noise
        among the tokens above `pivot`, and the argmax without noise (the first of equal maxima,
        as torch.argmax), in one pass."""
        cols = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        where = tl.zeros([BLOCK], tl.int32)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        top_at = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            at = start + cols
            s = tl.load(row_ptr + at, mask=at < vocab, other=float("-inf")).to(tl.float32) * inv_t
            higher = s > top  # strict: an equal later token does not displace an earlier one
            top = tl.where(higher, s, top)
            top_at = tl.where(higher, at, top_at)
            if NOISE:
                gumbel = -tl.log(-tl.log(_uniform(key, at)))
                score = tl.where(s > pivot, s + gumbel, float("-inf"))
                better = score > best
                best = tl.where(better, score, best)
                where = tl.where(better, at, where)
        peak = tl.max(top, 0)
        likeliest = tl.min(tl.where(top == peak, top_at, vocab), 0)
        drawn = likeliest
        if NOISE:
            high = tl.max(best, 0)
            drawn = tl.min(tl.where(best == high, where, vocab), 0)
        return drawn, likeliest

    @triton.jit
    def _mass_pass(row_ptr, vocab, inv_t, peak, threshold, BLOCK: tl.constexpr):
        """(mass of the tokens whose logit × inv_t is above `threshold`, mass of all), both
        unnormalised (exp(s - peak)), in one pass."""
        cols = tl.arange(0, BLOCK)
        above = tl.zeros([BLOCK], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            at = start + cols
            s = tl.load(row_ptr + at, mask=at < vocab, other=float("-inf")).to(tl.float32) * inv_t
            e = tl.exp(s - peak)
            total += e
            above += tl.where(s > threshold, e, 0.0)
        return tl.sum(above, 0), tl.sum(total, 0)

    @triton.jit
    def _sample_kernel(logits_ptr, row_stride, temperature_ptr, top_p_ptr, seed_ptr, out_ptr,
                       vocab, BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        temperature = tl.load(temperature_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        seed = tl.load(seed_ptr + row)
        if temperature == 0:
            _, chosen = _draw_pass(row_ptr, vocab, 1.0, seed, float("-inf"), BLOCK, False)
        else:
            inv_t = 1.0 / temperature
            chosen, likeliest = _draw_pass(row_ptr, vocab, inv_t, _round_key(seed, 0),
                                           float("-inf"), BLOCK, True)
            if top_p < 1:
                peak = tl.load(row_ptr + likeliest).to(tl.float32) * inv_t
                s_draw = tl.load(row_ptr + chosen).to(tl.float32) * inv_t
                above, total = _mass_pass(row_ptr, vocab, inv_t, peak, s_draw, BLOCK)
                cut = top_p * total
                round_ = 1
                while above >= cut and round_ < MAX_ROUNDS:  # outside the nucleus: again,
                    pivot = s_draw  # among the tokens more likely than this one only
                    chosen, _ = _draw_pass(row_ptr, vocab, inv_t, _round_key(seed, round_),
                                           pivot, BLOCK, True)
                    s_draw = tl.load(row_ptr + chosen).to(tl.float32) * inv_t
                    above, _ = _mass_pass(row_ptr, vocab, inv_t, peak, s_draw, BLOCK)
                    round_ += 1
                if above >= cut:  # every round missed (vanishingly rare): the likeliest token
                    chosen = likeliest
        tl.store(out_ptr + row, chosen.to(tl.int64))


@torch.library.custom_op("labkit::sample", mutates_args=())
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, block: int = 0, warps: int = 0) -> torch.Tensor:
    """Each row's next token (see the module's docstring); `logits` [rows, vocab], any float.
    `block` and `warps` (0: chosen by the row count) size each program's steps."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not block:  # few rows: few programs, each must keep more of the vocabulary in flight
        block, warps = (8192, 16) if rows < SMALL_BATCH else (BLOCK, 8)
    _sample_kernel[(rows,)](logits, logits.stride(0), temperature.float(), top_p.float(),
                            seeds.to(torch.int32), out, vocab, BLOCK=block,
                            MAX_ROUNDS=MAX_ROUNDS, num_warps=warps)
    return out


@sample.register_fake
def _(logits, temperature, top_p, seeds, block=0, warps=0):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
