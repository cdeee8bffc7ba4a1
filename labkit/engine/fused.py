"""A decoder layer's elementwise work in three Triton kernels, between its matrix products.

Eager PyTorch launches one kernel per operation, and each kernel reads and writes the whole
activation. In a decode step the activations are tiny (one token per row), so what each of those
kernels costs is its fixed launch cost, even replayed from a CUDA graph, and together they were a
quarter to over 40 % of a decode step. Here each stretch between two matrix products is one kernel
that reads its inputs once (what it saved: benchmarks/RESULTS.md, "Fused elementwise kernels"):

    add_rms_norm   residual + x, then RMSNorm of that sum    (before attention and before the MLP;
                                                              the sum is the next residual)
    rope_write_kv  RoPE on q and k, k and v into the cache   (after the qkv product)
    silu_mul       SiLU(gate) · up                           (after the gate/up product)

Before an FP8 product of many tokens (`labkit.engine.quant`'s W8A8, `torch._scaled_mm`), the
norm and SiLU kernels also quantize their output, each token's row with its own scale, and
write e4m3 values and scales instead of the model's dtype (`add_rms_norm_fp8`, `silu_mul_fp8`):
the same bits as `quant.quantize_rows` applied to their output, without a kernel of its own
before each product (112 kernels in a 3B step).

The residual add of a layer's MLP output happens in the next layer's first `add_rms_norm` (and
the last layer's in the final norm), so the layers pass (x, residual) along, as vLLM's do.

Each works on any number of tokens (rows × tokens per row), so prefill chunks use them too.
They compute in float32 and round to the model's dtype where the eager formulas
(`labkit.engine.llama.EagerOps`) round, so the two paths agree within a rounding step
(tests/test_gpu_fused.py). Each kernel is a custom op, like `labkit::decode_attention`: CUDA
graphs capture it and torch.compile calls it as it is. Used on CUDA when Triton is installed;
elsewhere the model runs `EagerOps`.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: the eager ops run instead
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


PDL = True  # benchmarks/fused_decode.py turns it off to measure what it buys


def pdl(device: torch.device) -> bool:
    """Whether kernels launch with programmatic dependent launch (`labkit.engine.gemv`): on
    Hopper (compute capability 9) and later."""
    return PDL and _hopper_or_later(device)


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    """Asked once per device: every kernel launch of an eager step asks."""
    return torch.cuda.get_device_capability(device)[0] >= 9


if triton is not None:

    @triton.jit
    def quantize_row(x, live, q_ptr, scale_ptr, token, at, FP8_MAX: tl.constexpr,
                     MIN_SCALE: tl.constexpr):
        """One token's row x (float32) to e4m3 with its own scale: max |x| / FP8_MAX, x / scale
        rounded to nearest even. IEEE divisions (Triton's `/` is approximate), as the eager
        `quant._quantize` divides."""
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), FP8_MAX), MIN_SCALE)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + at, q.to(q_ptr.dtype.element_ty), mask=live)
        tl.store(scale_ptr + token, scale)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, eps, scale_ptr,
                             HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr,
                             FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)  # one program per token: the whole hidden vector
        cols = tl.arange(0, BLOCK)
        live = cols < HIDDEN
        at = token * HIDDEN + cols
        dtype = sum_ptr.dtype.element_ty
        x = tl.load(x_ptr + at, mask=live, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + at, mask=live, other=0.0).to(tl.float32)
            x = x.to(dtype).to(tl.float32)  # the residual stream is kept in the model's dtype
        tl.store(sum_ptr + at, x.to(dtype), mask=live)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / HIDDEN + eps)
        weight = tl.load(weight_ptr + cols, mask=live, other=0.0).to(tl.float32)
        out = (x * rstd * weight).to(dtype)
        if QUANTIZE:  # out_ptr: e4m3, from the value the model's dtype would have held
            quantize_row(out.to(tl.float32), live, out_ptr, scale_ptr, token, at, FP8_MAX,
                         MIN_SCALE)
        else:
            tl.store(out_ptr + at, out, mask=live)

    @triton.jit
    def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, slots_row_stride,
                              tokens_per_row, q_ptr, k_cache_ptr, v_cache_ptr,
                              HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                              ROPE_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                              DIM: tl.constexpr, PDL: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)  # one program per token: all its heads
        if PDL:  # launched early, beside the kernel before (labkit.engine.gemv): wait for it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        HALF: tl.constexpr = DIM // 2
        dtype = q_ptr.dtype.element_ty
        qkv = qkv_ptr + token * (HEADS + 2 * KV_HEADS) * DIM  # q heads, k heads, v heads
        # slots may be a view (a column block of the runner's packed step): read it in place
        row, column = token // tokens_per_row, token % tokens_per_row
        slot = tl.load(slots_ptr + row * slots_row_stride + column)  # page × page size + offset
        # q and k heads side by side, as rows of a (heads, half) tile: RoPE turns each pair
        # (first half, second half) of a head's dimensions by the token's angle.
        head = tl.arange(0, ROPE_HEADS_PAD)[:, None]
        half = tl.arange(0, HALF)[None, :]
        rope_live = head < HEADS + KV_HEADS
        first = tl.load(qkv + head * DIM + half, mask=rope_live, other=0.0).to(tl.float32)
        second = tl.load(qkv + head * DIM + HALF + half, mask=rope_live, other=0.0
                         ).to(tl.float32)
        angle = token * DIM + half  # cos, sin: (tokens, dim), both halves stored
        cos1 = tl.load(cos_ptr + angle).to(tl.float32)
        cos2 = tl.load(cos_ptr + angle + HALF).to(tl.float32)
        sin1 = tl.load(sin_ptr + angle).to(tl.float32)
        sin2 = tl.load(sin_ptr + angle + HALF).to(tl.float32)
        # x·cos + rotate(x)·sin, each product rounded as the eager ops round it (the launch
        # turns off multiply-add fusion, which would keep the products unrounded)
        new_first = ((first * cos1).to(dtype).to(tl.float32)
                     + (-second * sin1).to(dtype).to(tl.float32)).to(dtype)
        new_second = ((second * cos2).to(dtype).to(tl.float32)
                      + (first * sin2).to(dtype).to(tl.float32)).to(dtype)
        is_q = head < HEADS
        q_at = q_ptr + token * HEADS * DIM + head * DIM + half
        tl.store(q_at, new_first, mask=is_q)
        tl.store(q_at + HALF, new_second, mask=is_q)
        is_k = (head >= HEADS) & rope_live
        k_at = k_cache_ptr + slot * KV_HEADS * DIM + (head - HEADS) * DIM + half
        cache_dtype = k_cache_ptr.dtype.element_ty  # the model's, or FP8 (rounded, saturating)
        tl.store(k_at, new_first.to(cache_dtype), mask=is_k)
        tl.store(k_at + HALF, new_second.to(cache_dtype), mask=is_k)
        # v goes to the cache as it is
        kv_head = tl.arange(0, KV_HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM)[None, :]
        v_live = kv_head < KV_HEADS
        v = tl.load(qkv + (HEADS + KV_HEADS + kv_head) * DIM + dims, mask=v_live)
        tl.store(v_cache_ptr + slot * KV_HEADS * DIM + kv_head * DIM + dims, v.to(cache_dtype),
                 mask=v_live)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, scale_ptr, WIDTH: tl.constexpr,
                         BLOCK: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
                         MIN_SCALE: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # quantizing: the whole row
        live = cols < WIDTH
        dtype = gate_up_ptr.dtype.element_ty
        gate = tl.load(gate_up_ptr + token * 2 * WIDTH + cols, mask=live, other=0.0
                       ).to(tl.float32)
        up = tl.load(gate_up_ptr + token * 2 * WIDTH + WIDTH + cols, mask=live, other=0.0
                     ).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # rounded, as F.silu's
        out = (silu * up).to(dtype)
        if QUANTIZE:
            quantize_row(out.to(tl.float32), live, out_ptr, scale_ptr, token,
                         token * WIDTH + cols, FP8_MAX, MIN_SCALE)
        else:
            tl.store(out_ptr + token * WIDTH + cols, out, mask=live)


@torch.library.custom_op("labkit::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) · weight, x + residual) over the last dimension; with no
    residual (the first layer), x itself is the sum."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, launch_add_rms_norm(x, residual, weight, eps, out)


def launch_add_rms_norm(x, residual, weight, eps, out, scale=None, fp8_max: float = 0.0,
                        min_scale: float = 0.0) -> torch.Tensor:
    """Run the norm kernel into `out` (the model's dtype; or e4m3, each token's scale into
    `scale`, for `quant.add_rms_norm_fp8`); returns the sum x + residual."""
    x = x.contiguous()
    hidden = x.shape[-1]
    summed = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(x.numel() // hidden,)](
        x, x if residual is None else residual.contiguous(), weight, out, summed, eps,
        out if scale is None else scale,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        QUANTIZE=scale is not None, FP8_MAX=fp8_max, MIN_SCALE=min_scale,
        num_warps=8 if block >= 2048 else 4)
    return summed


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    x = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x, torch.empty_like(x)


@torch.library.custom_op("labkit::rope_write_kv", mutates_args=("kv",))
def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                  layer: int, slots: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k of a qkv product (rows, tokens, (heads + 2 × kv_heads) × dim); k and v
    go to `layer` of the cache kv (layers, 2, pages, page_size, kv_heads, dim) at the flat
    slots (rows, tokens). cos, sin: (rows, tokens, 1, dim). Returns q (rows, tokens, heads,
    dim)."""
    kv_heads, dim = kv.shape[-2:]
    heads = qkv.shape[-1] // dim - 2 * kv_heads
    qkv = qkv.contiguous()
    q = qkv.new_empty(*qkv.shape[:-1], heads, dim)
    k_cache, v_cache = kv[layer].unbind(0)
    if slots.stride(-1) != 1:
        slots = slots.contiguous()
    use_pdl = pdl(qkv.device)
    _rope_write_kv_kernel[(slots.numel(),)](
        qkv, cos.contiguous(), sin.contiguous(), slots, slots.stride(0), slots.shape[1],
        q, k_cache, v_cache,
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim,
        ROPE_HEADS_PAD=triton.next_power_of_2(heads + kv_heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads), PDL=use_pdl, launch_pdl=use_pdl,
        enable_fp_fusion=False)  # a fused multiply-add would skip the products' rounding
    return q


@rope_write_kv.register_fake
def _(qkv, cos, sin, kv, layer, slots):
    kv_heads, dim = kv.shape[-2:]
    return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // dim - 2 * kv_heads, dim)


@torch.library.custom_op("labkit::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up, where gate and up are the two halves of the last dimension."""
    out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    launch_silu_mul(gate_up, out)
    return out


def launch_silu_mul(gate_up, out, scale=None, fp8_max: float = 0.0, min_scale: float = 0.0
                    ) -> None:
    """Run the SiLU kernel into `out` (the model's dtype, in blocks of at most 1024 columns;
    or e4m3, a whole row a program, each token's scale into `scale`)."""
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    block = triton.next_power_of_2(width)
    if scale is None:
        block = min(1024, block)
    _silu_mul_kernel[(out.numel() // width, triton.cdiv(width, block))](
        gate_up, out, out if scale is None else scale, WIDTH=width, BLOCK=block,
        QUANTIZE=scale is not None, FP8_MAX=fp8_max, MIN_SCALE=min_scale,
        num_warps=4 if scale is None else 8)


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
