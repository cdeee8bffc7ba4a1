"""`labkit.engine.sampling`'s draw on CUDA: one Triton program per row, reading the row's logits
in their own dtype, a few passes over the vocabulary and no sort.

    temperature 0   argmax (the first of equal maxima, as torch.argmax)
    top_p 1         argmax of logits / temperature + Gumbel noise: one pass
    top_p < 1       a pass for the softmax's max and sum, then per round: the Gumbel argmax among
                    the tokens above the pivot, and the mass of the tokens more likely than the
                    draw; the draw is kept when that mass is under top_p, else it is the pivot

Gumbel noise is -log(-log(u)) of Philox uniforms (`tl.rand`) keyed by the row's seed, the round
and the token's index. A custom op, so CUDA graphs capture it and torch.compile calls it as is.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: sampling runs its eager path
    triton = None

BLOCK = 2048
MAX_ROUNDS = 32  # as labkit.engine.sampling.MAX_ROUNDS


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _argmax_pass(row_ptr, vocab, inv_t, seed, round_, pivot, V_PAD: tl.constexpr,
                     BLOCK: tl.constexpr, NOISE: tl.constexpr):
        """The index of the largest logit * inv_t (+ Gumbel noise), among those above pivot."""
        cols = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        where = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            at = start + cols
            s = tl.load(row_ptr + at, mask=at < vocab, other=float("-inf")).to(tl.float32) * inv_t
            score = s
            if NOISE:
                u = tl.rand(seed, at + round_ * V_PAD)
                score = tl.where(s > pivot, s - tl.log(-tl.log(u)), float("-inf"))
            better = score > best  # strict: an equal later token does not displace an earlier
            best = tl.where(better, score, best)
            where = tl.where(better, at, where)
        top = tl.max(best, 0)
        return tl.min(tl.where(best == top, where, vocab), 0)

    @triton.jit
    def _sample_kernel(logits_ptr, row_stride, temperature_ptr, top_p_ptr, seed_ptr, out_ptr,
                       vocab, V_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       MAX_ROUNDS: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        temperature = tl.load(temperature_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        seed = tl.load(seed_ptr + row)
        cols = tl.arange(0, BLOCK)
        if temperature == 0:
            chosen = _argmax_pass(row_ptr, vocab, 1.0, seed, 0, float("-inf"), V_PAD, BLOCK,
                                  False)
        elif top_p >= 1:
            chosen = _argmax_pass(row_ptr, vocab, 1.0 / temperature, seed, 0, float("-inf"),
                                  V_PAD, BLOCK, True)
        else:
            inv_t = 1.0 / temperature
            # The most likely token: in the nucleus always, the answer if every round rejects.
            chosen = _argmax_pass(row_ptr, vocab, inv_t, seed, 0, float("-inf"), V_PAD, BLOCK,
                                  False)
            peak = tl.load(row_ptr + chosen).to(tl.float32) * inv_t
            total = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                at = start + cols
                s = tl.load(row_ptr + at, mask=at < vocab, other=float("-inf"))
                total += tl.exp(s.to(tl.float32) * inv_t - peak)
            cut = top_p * tl.sum(total, 0)  # top_p of the mass, unnormalised
            pivot = float("-inf")
            round_ = 0
            while round_ < MAX_ROUNDS:
                draw = _argmax_pass(row_ptr, vocab, inv_t, seed, round_, pivot, V_PAD, BLOCK,
                                    True)
                s_draw = tl.load(row_ptr + draw).to(tl.float32) * inv_t
                above = tl.zeros([BLOCK], tl.float32)
                for start in range(0, vocab, BLOCK):
                    at = start + cols
                    s = tl.load(row_ptr + at, mask=at < vocab, other=float("-inf"))
                    s = s.to(tl.float32) * inv_t
                    above += tl.where(s > s_draw, tl.exp(s - peak), 0.0)
                if tl.sum(above, 0) < cut:
                    chosen = draw
                    round_ = MAX_ROUNDS
                else:
                    pivot = s_draw
                    round_ += 1
        tl.store(out_ptr + row, chosen.to(tl.int64))


@torch.library.custom_op("labkit::sample", mutates_args=())
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor) -> torch.Tensor:
    """Each row's next token (see the module's docstring); `logits` [rows, vocab], any float."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    v_pad = triton.cdiv(vocab, BLOCK) * BLOCK
    _sample_kernel[(rows,)](logits, logits.stride(0), temperature.float(), top_p.float(),
                            seeds.to(torch.int32), out, vocab, V_PAD=v_pad, BLOCK=BLOCK,
                            MAX_ROUNDS=MAX_ROUNDS, num_warps=8)
    return out


@sample.register_fake
def _(logits, temperature, top_p, seeds):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
