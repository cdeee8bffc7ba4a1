"""The matrix-vector products of a one-token step (batch-1 decode), as Triton kernels that
overlap one another.

At batch 1 a decode step is a chain of matrix-vector products (GEMV): each reads one weight
matrix once, and its time should be the matrix's bytes over memory bandwidth. A 3B model's
matrices take microseconds to read, so what a kernel costs besides its bytes (its launch, the
first reads' latency, the last programs' tail) is a large share of it, and cuBLAS plus the small
kernels between the products (norm, SiLU) left the step well above its floor. Three changes:

- The elementwise work runs inside the product that follows it, as a prologue on its input:
  `norm_linear` is RMSNorm(x + residual) @ W.T (the sum is the next residual), `silu_linear`
  is (SiLU(gate) · up) @ W.T, `final_norm_linear` the last norm and the lm_head. A layer is
  then 6 kernels (qkv, RoPE + cache write, attention, o, gate/up, down) instead of 9.
- Narrow, long tiles: each program computes BLOCK_N (4 or 8) outputs, streaming its BLOCK_N
  weight rows 1,024 columns at a time and multiplying them with the input in float32; it sums
  once at the end. Thousands of small programs keep enough reads in flight
  (benchmarks/decode_gemv.py measures them against cuBLAS).
- Programmatic dependent launch (PDL, Hopper and later): each kernel lets the next one launch
  as soon as all its programs run (`gdc_launch_dependents`); the next one reads its first
  weight tile (weights do not depend on the kernel before), then waits for the kernel before
  to end (`gdc_wait`) before it reads any activation or writes anything. So one kernel's tail
  and the next one's start overlap. Every program waits, which keeps the order transitive: a
  kernel that ends has seen every earlier one end. The RoPE and attention kernels of the step
  take part too (`fused`, `paged_attention`).

What they bring, with and without PDL: benchmarks/RESULTS.md ("Batch-1 products as overlapping
GEMV kernels"). The prologues round where the eager ops round
(`labkit.engine.llama.EagerOps`), so results agree with `fused` + cuBLAS within the products'
own rounding (tests/test_gpu_fused.py). Steps of more tokens are matrix-matrix products, which
cuBLAS does well on tensor cores. Timings: benchmarks/RESULTS.md ("Continuous batching engine").

FP8 weights (`labkit.engine.quant`): the same kernels take e4m3 weights and their per-row
scales (`scale`), convert each weight to float32 in registers and multiply each output's sum by
its row's scale once, so a step reads one byte per weight (tests/test_quant.py runs them under
Triton's interpreter, tests/test_gpu_quant.py on the GPU).
"""

from __future__ import annotations

import torch

from labkit.engine import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: the model runs EagerOps
    triton = None

NONE, NORM, SILU = 0, 1, 2  # the prologue on the input


def available(device: torch.device, tokens: int) -> bool:
    """A step of one token (batch-1 decode): more rows are a job for tensor cores."""
    return fused.available(device) and tokens == 1


if triton is not None:

    @triton.jit
    def _input_chunk(x_ptr, residual_ptr, norm_ptr, rstd, cols, K: tl.constexpr,
                     EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     dtype: tl.constexpr):
        """The input at columns `cols`, after the prologue, in float32 (BLOCK_K,)."""
        live = (cols < K) | EVEN_K  # all true, and no mask compiled, when tiles fit K
        if PROLOGUE == 2:  # SiLU(gate) · up: gate and up are the halves of a row of 2K
            gate = tl.load(x_ptr + cols, mask=live, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + cols, mask=live, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            return (silu * up).to(dtype).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=live, other=0.0).to(tl.float32)
        if PROLOGUE == 1:  # RMSNorm(x + residual) · weight
            if HAS_RESIDUAL:
                x = (x + tl.load(residual_ptr + cols, mask=live, other=0.0).to(tl.float32)
                     ).to(dtype).to(tl.float32)
            weight = tl.load(norm_ptr + cols, mask=live, other=0.0).to(tl.float32)
            x = (x * rstd * weight).to(dtype).to(tl.float32)
        return x

    @triton.jit
    def _gemv_kernel(x_ptr, residual_ptr, norm_ptr, sum_ptr, eps, w_ptr, scale_ptr, out_ptr,
                     N, K: tl.constexpr, EVEN_K: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, WRITE_SUM: tl.constexpr, HAS_SCALE: tl.constexpr,
                     PDL: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_live = n < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + n.to(tl.int64)[:, None] * K
        # The weights do not depend on the kernel before: read the first tile while it ends.
        w = tl.load(w_rows + cols[None, :], other=0.0,
                    mask=n_live[:, None] & ((cols[None, :] < K) | EVEN_K))
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rstd = 0.0
        if PROLOGUE == 1:  # RMSNorm needs the whole row's sum of squares first
            every = tl.arange(0, K_PAD)
            x = tl.load(x_ptr + every, mask=every < K, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x = (x + tl.load(residual_ptr + every, mask=every < K, other=0.0)
                     .to(tl.float32)).to(dtype).to(tl.float32)
            if WRITE_SUM:
                if tl.program_id(0) == 0:  # the new residual, written once
                    tl.store(sum_ptr + every, x.to(dtype), mask=every < K)
            rstd = tl.rsqrt(tl.sum(x * x, 0) / K + eps)
        chunk = _input_chunk(x_ptr, residual_ptr, norm_ptr, rstd, cols, K, EVEN_K, PROLOGUE,
                             HAS_RESIDUAL, dtype)
        acc = w.to(tl.float32) * chunk[None, :]  # (BLOCK_N, BLOCK_K), summed once at the end
        for start in range(BLOCK_K, K, BLOCK_K):
            w = tl.load(w_rows + start + cols[None, :], other=0.0,
                        mask=n_live[:, None] & ((start + cols[None, :] < K) | EVEN_K))
            chunk = _input_chunk(x_ptr, residual_ptr, norm_ptr, rstd, start + cols, K, EVEN_K,
                                 PROLOGUE, HAS_RESIDUAL, dtype)
            acc += w.to(tl.float32) * chunk[None, :]
        out = tl.sum(acc, 1)
        if HAS_SCALE:  # FP8 weights: each row's scale, once on its sum
            out *= tl.load(scale_ptr + n, mask=n_live, other=0.0)
        tl.store(out_ptr + n, out.to(dtype), mask=n_live)


# Tiles by weight shape (N, K) that benchmarks/decode_gemv.py tries; else `tile`'s choice.
# FP8 weights (one byte each) have their own table.
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {}
# FP8, the 3B shape's products, best of 44 tiles on an H100 (benchmarks/decode_gemv_fp8_h100.json):
# 8-11 % faster than `tile`'s rule on the two small products, 0-0.4 % on the others.
FP8_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (5120, 3072): (16, 512, 8, 2),  # qkv
    (3072, 3072): (8, 4096, 4, 1),  # o: one tile per row, masked past 3,072
    (16384, 3072): (32, 512, 8, 1),  # gate/up
    (3072, 8192): (4, 1024, 4, 1),  # down
    (128256, 3072): (4, 4096, 4, 2),  # lm_head
}


def tile(n: int, k: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for a weight of N rows and K columns. Measured on an
    H200 over every product of the 3B shape (benchmarks/decode_gemv.py): narrow, long tiles,
    many programs (768 to 32k) with few warps each, win; twice as many rows and warps for the
    long rows of the down projection. FP8 weights (itemsize 1), measured on an H100: the narrow
    tile with one stage, for every shape (within 1 % of each product's best but the two small
    ones; doubling the rows to move the bf16 tiles' bytes was 6-12 % slower)."""
    table = FP8_CONFIGS if itemsize == 1 else CONFIGS
    if (n, k) in table:
        return table[n, k]
    if itemsize == 1:
        return 4, 1024, 4, 1
    return (8, 1024, 8, 2) if k >= 8192 else (4, 1024, 4, 2)


def _launch(x, weight, prologue: int, residual=None, norm=None, eps=0.0, write_sum=False,
            scale=None):
    """x: (1, K) for NONE and NORM, (1, 2K) for SILU; contiguous. `scale`: (N,) float32 for an
    FP8 weight (`labkit.engine.quant`), applied to each output's sum."""
    n, k = weight.shape
    block_n, block_k, warps, stages = tile(n, k, weight.element_size())
    assert x.shape[0] == 1 and x.is_contiguous()
    out = x.new_empty(1, n)
    summed = x.new_empty(1, k) if write_sum else out
    use_pdl = x.is_cuda and fused.pdl(x.device)  # the CPU: tests under TRITON_INTERPRET=1
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, x if residual is None else residual, x if norm is None else norm, summed, eps,
        weight, weight if scale is None else scale, out, n, K=k, EVEN_K=k % block_k == 0,
        K_PAD=triton.next_power_of_2(k), BLOCK_N=block_n, BLOCK_K=block_k, PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None, WRITE_SUM=write_sum, HAS_SCALE=scale is not None,
        PDL=use_pdl, num_warps=warps, num_stages=stages, launch_pdl=use_pdl)
    return out, summed


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., width) as one contiguous row."""
    return x.reshape(1, x.shape[-1]).contiguous()


@torch.library.custom_op("labkit::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor, eps: float,
                weight: torch.Tensor, scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) · norm @ weight.T, x + residual); with no residual, x is the
    sum. With `scale`, weight is FP8 and W = weight · scale[:, None] (so for every op here)."""
    shape = x.shape[:-1]
    out, summed = _launch(_flat(x), weight, NORM, None if residual is None else _flat(residual),
                          norm, eps, write_sum=True, scale=scale)
    return out.view(*shape, -1), summed.view(*shape, -1)


@norm_linear.register_fake
def _(x, residual, norm, eps, weight, scale=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape)


@torch.library.custom_op("labkit::final_norm_linear", mutates_args=())
def final_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, eps: float,
                      weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x + residual) · norm @ weight.T, the sum not kept (the last norm, then lm_head)."""
    shape = x.shape[:-1]
    out, _ = _launch(_flat(x), weight, NORM, _flat(residual), norm, eps, scale=scale)
    return out.view(*shape, -1)


@final_norm_linear.register_fake
def _(x, residual, norm, eps, weight, scale=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("labkit::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x @ weight.T."""
    out, _ = _launch(_flat(x), weight, NONE, scale=scale)
    return out.view(*x.shape[:-1], -1)


@linear.register_fake
def _(x, weight, scale=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("labkit::silu_linear", mutates_args=())
def silu_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """(SiLU(gate) · up) @ weight.T, where gate and up are the halves of gate_up's last
    dimension."""
    out, _ = _launch(_flat(gate_up), weight, SILU, scale=scale)
    return out.view(*gate_up.shape[:-1], -1)


@silu_linear.register_fake
def _(gate_up, weight, scale=None):
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])
