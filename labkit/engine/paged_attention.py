"""Decode attention straight from the paged KV cache: one Triton kernel, no gather.

In a decode step every row has one new query token. The plain-PyTorch way (`kv_cache.read`)
first copies each row's pages side by side, then runs attention over the copy: at hundreds of
rows that copy was most of the step (benchmarks/RESULTS.md, "Continuous batching engine").
This kernel instead walks each row's block table and reads its keys and values where they lie,
only as far as the row's own length, with the running (online) softmax of FlashAttention:

    for each page of the row:      scores = q · K_page / sqrt(d)        (group × page tokens)
                                   m_new  = max(m, max(scores))
                                   acc    = acc · e^(m - m_new) + e^(scores - m_new) · V_page
                                   l      = l · e^(m - m_new) + sum(e^(scores - m_new))
    out = acc / l

One program per (row, KV head) computes the `group` query heads that share that KV head (GQA),
so each key and value is read from memory once; it takes 64 tokens (4 pages) at a time, and
multiplies on tensor cores (`tl.dot`). An FP8 cache is read as it is stored, half the bytes, and
widened to the queries' dtype in registers. Used on CUDA when Triton is installed (it comes
with PyTorch's CUDA builds); elsewhere `labkit.engine.llama` gathers and calls SDPA.
"""

from __future__ import annotations

import torch

from labkit.engine import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: the SDPA path runs instead
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, out_ptr, scale,
                       table_stride,
                       KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       DIM: tl.constexpr, PAGE: tl.constexpr, TOKENS: tl.constexpr,
                       PRECISION: tl.constexpr, PDL: tl.constexpr):
        row, kv_head = tl.program_id(0), tl.program_id(1)
        if PDL:  # launched early, beside the kernel before (labkit.engine.gemv): wait for it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        heads = tl.arange(0, GROUP_PAD)  # padded to 16: the smallest tensor-core product
        dims = tl.arange(0, DIM)
        # q: (rows, kv_heads * group, dim); this program's group of query heads
        q_at = (row * KV_HEADS * GROUP + kv_head * GROUP + heads)[:, None] * DIM + dims[None, :]
        q = tl.load(q_ptr + q_at, mask=(heads < GROUP)[:, None], other=0.0)
        length = tl.load(lengths_ptr + row)
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((GROUP_PAD,), tl.float32)  # noqa: E741 (the softmax denominator's usual name)
        acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
        for start in range(0, length, TOKENS):  # TOKENS cached tokens (a few pages) at a time
            token = start + tl.arange(0, TOKENS)
            live = token < length
            page = tl.load(table_ptr + row * table_stride + token // PAGE, mask=live, other=0)
            # cache: (pages, page tokens, kv_heads, dim)
            kv_at = ((page * PAGE + token % PAGE) * KV_HEADS + kv_head)[:, None] * DIM \
                + dims[None, :]
            # an FP8 cache's values widened to the queries' dtype (a no-op for the model's)
            k = tl.load(k_ptr + kv_at, mask=live[:, None], other=0.0).to(q.dtype)
            v = tl.load(v_ptr + kv_at, mask=live[:, None], other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(live[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            weights = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(weights, 1)  # noqa: E741
            acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v,
                                                input_precision=PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + q_at, out.to(out_ptr.dtype.element_ty), mask=(heads < GROUP)[:, None])


# A custom op, so torch.compile treats the kernel as one opaque call (its own Triton code is
# already what a compiler would emit) and fuses the work around it.
@torch.library.custom_op("labkit::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Attention of one query token per row over that row's first `lengths[row]` cached tokens.

    q: (rows, heads, dim); k_cache, v_cache: (pages, page tokens, kv_heads, dim);
    block_table: (rows, pages per row); lengths: (rows,). Returns (rows, heads, dim)."""
    rows, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    use_pdl = fused.pdl(q.device)
    _decode_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, block_table, lengths, out, dim ** -0.5,
        block_table.stride(0),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim, PAGE=page, TOKENS=max(64, page),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=use_pdl, launch_pdl=use_pdl)
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_table, lengths):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
