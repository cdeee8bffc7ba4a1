"""FP8 weights (`quantization="fp8"`, `labkit serve --quantization fp8`): the linear layers'
weights in float8 e4m3 with one scale per output channel, quantized at load from the model's
bf16 weights.

Why: a batch-1 decode step reads every weight once, so its floor is the bytes it reads over the
memory bandwidth (notebook 02). One byte a weight instead of two halves the products' share of
those bytes; at large batches the products are compute-bound, and Hopper's FP8 tensor cores do
twice the bf16 operations a second.

Quantization: for each output channel (a row of W, shape (N, K)), scale = max |row| / 448
(e4m3's largest finite value) and q = row / scale rounded to e4m3 (to nearest even), so
W ≈ q · scale[:, None]. A scale per row, not per tensor: one large row does not crush the others'
resolution, and the scale comes out of the product's sum as one multiply per output.

What each product runs (`linear`):

- a step of one token (batch-1 decode): `labkit.engine.gemv`'s kernels read q, convert it in
  registers, multiply with the bf16 input in float32 and apply the row's scale once to each sum;
  activations stay bf16 (W8A16);
- more tokens, `matmul="scaled_mm"` (the default on CUDA): `torch._scaled_mm` on the FP8 tensor
  cores (W8A8). Each token's input row gets its own scale at run time (dynamic, per token),
  and the product is (x_q @ q.T) · s_x · s_w, accumulated by the tensor cores' fast FP8 mode
  and rounded once: vLLM's `--quantization fp8` recipe on Hopper. The norm and SiLU kernels
  before the qkv, gate/up, down and lm_head products write their output quantized
  (`add_rms_norm_fp8`, `silu_mul_fp8`); the o product's input (attention's output) goes
  through `quantize_rows`, one Triton kernel;
- `matmul="dequant"`: q converted to the activations' dtype (exact: every e4m3 value is a bf16
  value), a bf16 matmul, then the scales: what benchmarks/engine.py times `scaled_mm`
  against, and what serves where `_scaled_mm` refuses the model's shapes (`pick_matmul`:
  with a warning, as it is slower than bf16 at large batches);
- the CPU has no FP8 matmul: the same two recipes run eagerly in float32 (q → float, times its
  scales; W8A8 quantizes and dequantizes the inputs too). That path exists for tests and for
  measuring accuracy (benchmarks/fp8_accuracy.py), not for speed.

What stays in the model's dtype: the embedding table (a step reads one row of it per token),
the norms (a few kB), and the KV cache (unless `kv_cache_dtype="fp8"`:
`labkit.engine.kv_cache`). `lm_head` gets an FP8 copy by default even when it is the embedding
table itself (tied, as in Llama 3.2 1B and 3B): at batch 1 it is read whole every
step, 0.79 GB of the 3B's 3.2 GB step in bf16, a quarter of the bytes once the layers are FP8,
while the embedding lookups keep their exact bf16 rows. The copy costs half the table again in
memory (0.39 GB for the 3B); `fp8_lm_head=False` keeps it bf16, and fp8_accuracy.py measures
both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from labkit.engine import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch: rows are quantized eagerly
    triton = None

log = logging.getLogger(__name__)

METHODS = ("none", "fp8")  # `labkit serve --quantization` (serve/cli.py lists the same)
MATMULS = ("scaled_mm", "dequant")  # how an FP8 product of more than one token runs on CUDA
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row (a padding token's input) keeps a finite scale
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
LINEARS = ("qkv", "o", "gate_up", "down")  # a layer's products
QUANTIZE_ROWS = 8192  # rows quantized at a time at load: bounds the float32 temporaries


def check_method(method: str | None) -> str | None:
    """"fp8", or None for the model's own dtype ("none" too); anything else is an error that
    lists what is supported."""
    if method in (None, "none"):
        return None
    if method not in METHODS:
        raise ValueError(f"quantization={method!r} is not supported; use one of "
                         f"{', '.join(METHODS)}")
    return method


def check_supported(device: torch.device | str, flag: str = "--quantization fp8",
                    instead: str = "--quantization none") -> None:
    """FP8 (weights, or the KV cache: `flag`) needs FP8 tensor cores on CUDA (compute
    capability 8.9 or newer); the CPU runs eager paths. Raises ValueError naming the card and
    what it supports (`instead`)."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                          else "cpu" if device == "auto" else device)
    if device.type != "cuda":
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"{flag} needs FP8 tensor cores (compute capability "
            f"{'.'.join(map(str, MIN_CAPABILITY))} or newer: L4/L40 (Ada), H100/H200 "
            f"(Hopper), Blackwell); {torch.cuda.get_device_name(device)} is "
            f"{'.'.join(map(str, capability))}. Supported on this GPU: {instead} "
            f"(the model's dtype)" + (f". Supported methods: {', '.join(METHODS)}"
                                      if flag.startswith("--quantization") else ""))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q (N, K) in e4m3, scale (N,) float32, W ≈ q · scale[:, None]."""
    parts = [_quantize(rows) for rows in weight.detach().split(QUANTIZE_ROWS)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])[:, 0]


def _quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `rows` (any dtype) to e4m3 with its own scale: (q, scale (rows, 1))."""
    rows = rows.float()
    # Divided by 448 as a tensor: CUDA divides by a Python number as a multiply by its rounded
    # reciprocal, a bit off for some rows, where the kernels (and the CPU) divide exactly.
    fp8_max = torch.full((), FP8_MAX, device=rows.device)
    scale = (rows.abs().amax(-1, keepdim=True) / fp8_max).clamp(min=MIN_SCALE)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q · scale[:, None] in `dtype` (from float32)."""
    return (q.float() * scale[:, None]).to(dtype)


class Fp8Weight(nn.Module):
    """A linear weight (N, K) as e4m3 values `q` and per-output-channel float32 `scale`, and
    how its products of more than one token run (`matmul`, one of MATMULS)."""

    def __init__(self, weight: torch.Tensor, matmul: str = "scaled_mm"):
        super().__init__()
        q, scale = quantize_weight(weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.matmul = matmul

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def extra_repr(self) -> str:
        return f"{tuple(self.q.shape)}, e4m3, per-channel scales, matmul={self.matmul}"


def linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """x @ W.T, for a weight in the model's dtype or an `Fp8Weight` (see the module's
    docstring for which recipe runs where)."""
    if not isinstance(weight, Fp8Weight):
        return x @ weight.T
    if weight.matmul == "scaled_mm":
        return scaled_mm(x, weight)
    return dequant_matmul(x, weight)


def dequant_matmul(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """W8A16: q in x's dtype (exact), a matmul in that dtype, the channel scales on the output
    in float32, rounded once more to x's dtype."""
    return (F.linear(x, weight.q.to(x.dtype)).float() * weight.scale).to(x.dtype)


def scaled_mm(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """W8A8: each token's input row quantized with its own scale, then (x_q @ q.T) · s_x · s_w:
    `torch._scaled_mm` with row-wise scales on CUDA (mat2 column-major:
    q.t() of the row-major (N, K) weight), the same arithmetic eagerly on the CPU."""
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return quantized_mm(xq, x_scale, weight, x.dtype).view(*x.shape[:-1], -1)


def quantized_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: Fp8Weight,
                 dtype: torch.dtype) -> torch.Tensor:
    """(xq @ q.T) · x_scale · s_w in `dtype`, for inputs already quantized per token: xq (M, K)
    e4m3, x_scale (M, 1) float32."""
    if xq.is_cuda:  # fast accumulation, as vLLM's FP8 GEMMs: 12 % less time at 512 rows on the
        # H100 for a 1-2e-3 relative change of the product (benchmarks/RESULTS.md)
        return torch._scaled_mm(xq, weight.q.t(), scale_a=x_scale, scale_b=weight.scale[None],
                                out_dtype=dtype, use_fast_accum=True)
    return ((xq.float() @ weight.q.float().T) * x_scale * weight.scale).to(dtype)


def takes_quantized_input(weight) -> bool:
    """Whether a product with `weight` runs W8A8 on CUDA: its input may come quantized from the
    kernel before it (`add_rms_norm_fp8`, `silu_mul_fp8`) instead of through `quantize_rows`."""
    return isinstance(weight, Fp8Weight) and weight.matmul == "scaled_mm" and weight.q.is_cuda


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of x (M, K): (e4m3 (M, K), float32 scales (M, 1)); one
    Triton kernel on CUDA (an eager chain would cost ~7 kernels per product), eager elsewhere."""
    if triton is not None and x.is_cuda:
        return quantize_rows_kernel(x)
    return _quantize(x)


if triton is not None:
    from labkit.engine.fused import quantize_row

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K: tl.constexpr, BLOCK: tl.constexpr,
                              FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one program per token: its whole row
        cols = tl.arange(0, BLOCK)
        live = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=live, other=0.0).to(tl.float32)
        quantize_row(x, live, q_ptr, scale_ptr, row, row * K + cols, FP8_MAX, MIN_SCALE)


@torch.library.custom_op("labkit::quantize_rows", mutates_args=())
def quantize_rows_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` by the Triton kernel (on the CPU under TRITON_INTERPRET=1 in tests)."""
    x = x.contiguous()
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(rows,)](x, q, scale, K=k, BLOCK=block, FP8_MAX=FP8_MAX,
                                   MIN_SCALE=MIN_SCALE, num_warps=8 if block >= 8192 else 4)
    return q, scale


@quantize_rows_kernel.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32))


# The norm and SiLU kernels (`labkit.engine.fused`) quantizing their own output: the same bits
# as `quantize_rows` of what they would have written, one kernel fewer before each product.
@torch.library.custom_op("labkit::add_rms_norm_fp8", mutates_args=())
def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused.add_rms_norm`, its normed rows quantized: (e4m3 (M, hidden), scales (M, 1),
    x + residual)."""
    rows = x.numel() // x.shape[-1]
    q = torch.empty(rows, x.shape[-1], dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    summed = fused.launch_add_rms_norm(x, residual, weight, eps, q, scale, FP8_MAX, MIN_SCALE)
    return q, scale, summed


@add_rms_norm_fp8.register_fake
def _(x, residual, weight, eps):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(rows, x.shape[-1], dtype=FP8),
            x.new_empty(rows, 1, dtype=torch.float32),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("labkit::silu_mul_fp8", mutates_args=())
def silu_mul_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused.silu_mul`, quantized: (e4m3 (M, width), scales (M, 1))."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * width)
    q = torch.empty(rows, width, dtype=FP8, device=gate_up.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device)
    fused.launch_silu_mul(gate_up, q, scale, FP8_MAX, MIN_SCALE)
    return q, scale


@silu_mul_fp8.register_fake
def _(gate_up):
    width = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * width)
    return (gate_up.new_empty(rows, width, dtype=FP8),
            gate_up.new_empty(rows, 1, dtype=torch.float32))


def parts(weight: torch.Tensor | Fp8Weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, scale or None): how `gemv`'s kernels take a weight."""
    return (weight.q, weight.scale) if isinstance(weight, Fp8Weight) else (weight, None)


@torch.no_grad()
def quantize_model(model: nn.Module, lm_head: bool = True) -> None:
    """The compact Llama's products (`LINEARS` of every layer, and `lm_head` unless told not
    to) as `Fp8Weight`s, in place; each bf16 matrix the model alone held is freed as it goes.
    Embeddings and norms keep their dtype."""
    device = model.embed.device
    check_supported(device)
    if device.type != "cuda":
        log.warning("FP8 weights on the CPU: each product converts its FP8 weight back "
                    "eagerly (for tests and accuracy measurements; no speed-up)")
    for layer in model.layers:
        for name in LINEARS:
            _swap(layer, name)
    if lm_head:
        _swap(model, "lm_head")
    set_matmul(model, pick_matmul(model))


def _swap(module: nn.Module, name: str) -> None:
    weight = getattr(module, name)
    delattr(module, name)  # a Parameter's slot cannot take a module
    setattr(module, name, Fp8Weight(weight))


def fp8_weights(model: nn.Module) -> list[Fp8Weight]:
    return [m for m in model.modules() if isinstance(m, Fp8Weight)]


def set_matmul(model: nn.Module, matmul: str) -> None:
    """How every FP8 product of more than one token runs (one of MATMULS); CUDA graphs
    captured before keep the old way, so capture after this."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul={matmul!r}: use one of {', '.join(MATMULS)}")
    for weight in fp8_weights(model):
        weight.matmul = matmul


def pick_matmul(model: nn.Module) -> str:
    """"scaled_mm" on CUDA, once `scaled_mm` (the activation kernel and `torch._scaled_mm`)
    has taken every FP8 weight shape of the model (tried here, before any CUDA graph capture,
    where an error could not be caught); where the GPU refuses it, "dequant" with a warning:
    correct (its logits replayed from CUDA graphs equal eager ones on an H100,
    tests/test_gpu_quant.py) but slower than bf16 at large batches. The CPU's way is "dequant":
    what a batch-1 step does."""
    weights = fp8_weights(model)
    if not weights or not weights[0].q.is_cuda:
        return "dequant"
    dtype = model.embed.dtype
    for weight in {tuple(w.shape): w for w in weights}.values():
        try:
            scaled_mm(torch.zeros(2, weight.shape[1], dtype=dtype, device=weight.q.device),
                      weight)
        except Exception as err:  # noqa: BLE001 - any refusal (torch's, Triton's)
            log.warning(
                "--quantization fp8: this GPU's FP8 tensor-core product (torch._scaled_mm, "
                "row-wise scales) refused a weight of shape %s (%s: %s). Steps of many tokens "
                "dequantize the weights to %s instead: batch-1 steps still read FP8, but a "
                "512-request batch ran at 0.39x bf16's tokens/s this way on an H100 "
                "(benchmarks/RESULTS.md); --quantization none serves large batches faster.",
                tuple(weight.shape), type(err).__name__, (str(err).splitlines() or [""])[0],
                str(dtype).removeprefix("torch."))
            return "dequant"
    return "scaled_mm"


def nbytes(weight: torch.Tensor | Fp8Weight) -> int:
    return sum(t.numel() * t.element_size() for t in parts(weight) if t is not None)


def step_read_bytes(model: nn.Module) -> int:
    """Bytes a one-token decode step reads from the weights: every product's matrix (FP8
    values and their scales where quantized), the norms and lm_head; not the embedding table,
    of which a step reads one row per token. For a tied bf16 lm_head that table is read whole,
    as lm_head. The bandwidth floor of a quantized model is this over the copy bandwidth."""
    total = nbytes(model.lm_head) + model.norm.numel() * model.norm.element_size()
    for layer in model.layers:
        total += sum(nbytes(getattr(layer, name)) for name in LINEARS)
        total += sum(t.numel() * t.element_size()
                     for t in (layer.input_norm, layer.post_attention_norm))
    return total
