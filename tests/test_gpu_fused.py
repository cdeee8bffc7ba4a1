"""GPU checks of the fused elementwise kernels (`labkit.engine.fused`) and of the few-row matrix
products (`labkit.engine.gemv`) against the eager ops they replace (`labkit.engine.llama.EagerOps`),
one op at a time and through the whole model."""

import gc

import pytest
import torch

from labkit.engine import fused, gemv
from labkit.engine.block_manager import BlockAllocator
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import EagerOps, FusedOps, GemvOps, Llama
from labkit.engine.model import load_model
from labkit.engine.runner import Chunk, ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DTYPES = [torch.bfloat16, torch.float32]
SHAPES = [(1, 1), (5, 1), (3, 7), (2, 64)]  # (rows, tokens per row): decode steps and prefills


def random(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,tokens", SHAPES)
@pytest.mark.parametrize("hidden", [256, 3072])
@pytest.mark.parametrize("first_layer", [True, False])
def test_add_rms_norm_matches_eager(dtype, rows, tokens, hidden, first_layer):
    x = random(rows, tokens, hidden, dtype=dtype)
    residual = None if first_layer else random(rows, tokens, hidden, dtype=dtype, scale=4)
    weight = random(hidden, dtype=dtype, scale=0.3) + 1
    normed, summed = fused.add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_summed = EagerOps.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, want_summed)  # one float32 add, rounded once: as eager
    torch.testing.assert_close(normed, want_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,tokens", SHAPES)
@pytest.mark.parametrize("width", [640, 8192])
def test_silu_mul_matches_eager(dtype, rows, tokens, width):
    gate_up = random(rows, tokens, 2 * width, dtype=dtype, scale=3)
    torch.testing.assert_close(fused.silu_mul(gate_up), EagerOps.silu_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,tokens", SHAPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 32), (24, 8, 128)])
def test_rope_write_kv_matches_eager(dtype, rows, tokens, heads, kv_heads, dim):
    page = 16
    pages = rows * tokens // page + 3
    qkv = random(rows, tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    angles = torch.rand(rows, tokens, dim // 2, device="cuda") * 100
    angles = torch.cat([angles, angles], -1)[:, :, None]  # as Llama._rope_tables lays them out
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # Distinct slots outside page 0, in a column block of a wider tensor as the runner's
    # unpacked step has them; with several tokens, row 0's last one is padding (slot 0).
    slots = torch.zeros(rows, tokens + 3, dtype=torch.long, device="cuda")[:, 1:-2]
    slots[:] = (torch.randperm((pages - 1) * page, device="cuda")[:rows * tokens]
                + page).view(rows, tokens)
    if tokens > 1:
        slots[0, -1] = 0
    got_kv, want_kv = (torch.zeros(3, 2, pages, page, kv_heads, dim, dtype=dtype, device="cuda")
                       for _ in range(2))
    q = fused.rope_write_kv(qkv, cos, sin, got_kv, 1, slots)
    want_q = EagerOps.rope_write_kv(qkv, cos, sin, want_kv, 1, slots)
    assert q.shape == (rows, tokens, heads, dim)
    # Rounded as eager rounds, so equal but for a rare double rounding: allow one bf16 step
    # at the inputs' size (a wrong index or sign is off by far more).
    tolerance = {"atol": 2 ** -6, "rtol": 1.6e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(q, want_q, **tolerance)
    torch.testing.assert_close(got_kv[:, :, 1:], want_kv[:, :, 1:], **tolerance)  # 0: padding's
    assert not got_kv[[0, 2]].any(), "wrote to another layer"


def _close_products(got, want, dtype):
    """Equal within the products' rounding: the same float32 sums in another order, rounded to
    the dtype once (a wrong row, column or prologue is off by far more)."""
    tolerance = {"atol": 3e-2, "rtol": 1.6e-2} if dtype == torch.bfloat16 else \
        {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(got, want, **tolerance)


PRODUCTS = [(640, 256), (5120, 3072), (3072, 8192), (1000, 200)]  # (N, K); K=200 leaves a tail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", PRODUCTS)
@pytest.mark.parametrize("first_layer", [True, False])
def test_gemv_norm_linear_matches_fused(dtype, n, k, first_layer):
    x = random(1, 1, k, dtype=dtype)
    residual = None if first_layer else random(1, 1, k, dtype=dtype, scale=4)
    norm = random(k, dtype=dtype, scale=0.3) + 1
    weight = random(n, k, dtype=dtype, scale=k ** -0.5)
    out, summed = gemv.norm_linear(x, residual, norm, 1e-5, weight)
    want_out, want_summed = FusedOps.norm_linear(x, residual, norm, 1e-5, weight)
    assert torch.equal(summed, want_summed)
    _close_products(out, want_out, dtype)
    final = gemv.final_norm_linear(x, x if first_layer else residual, norm, 1e-5, weight)
    _close_products(final, FusedOps.final_norm_linear(x, x if first_layer else residual, norm,
                                                      1e-5, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", PRODUCTS)
def test_gemv_linear_and_silu_linear_match_fused(dtype, n, k):
    weight = random(n, k, dtype=dtype, scale=k ** -0.5)
    x = random(1, 1, k, dtype=dtype)
    _close_products(gemv.linear(x, weight), FusedOps.linear(x, weight), dtype)
    strided = random(1, 2 * k, dtype=dtype)[:, ::2]  # not contiguous: copied first
    _close_products(gemv.linear(strided, weight), strided @ weight.T, dtype)
    gate_up = random(1, 1, 2 * k, dtype=dtype, scale=3)
    _close_products(gemv.silu_linear(gate_up, weight), FusedOps.silu_linear(gate_up, weight),
                    dtype)


def test_gemv_chain_in_a_graph_keeps_its_order():
    """Many dependent products in one CUDA graph, launched with programmatic dependent launch
    on Hopper: each waits for the one before, so the chain's result equals the one kernel at a
    time version (a race would read a stale input)."""
    weights = [random(1024, 1024, dtype=torch.float32, scale=1024 ** -0.5) for _ in range(24)]
    norm = torch.ones(1024, device="cuda")
    x0 = random(1, 1024, dtype=torch.float32)

    def chain():
        x, residual = x0, None
        for w in weights:
            h, residual = gemv.norm_linear(x, residual, norm, 1e-5, w)
            x = gemv.linear(h, w)
        return x

    want = chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# bf16: the random 1B's 16 layers amplify single-step rounding differences (RMSNorm's sum,
# SiLU's exp) to a few % of the largest logit, as between the two attention paths in
# tests/test_gpu_continuous.py, which allows the same 0.05.
@pytest.mark.parametrize("source,dtype,tolerance", [("model", "fp32", 1e-4),
                                                    ("synthetic:llama-3.2-1b", "bf16", 0.05)])
def test_model_logits_fused_match_eager(source, dtype, tolerance):
    """A prefill (rows of 3, 4 and 5 tokens: padding included), a decode step of the 3 rows,
    then one of row 0 alone, with the fused kernels (with and without the gemv products, which
    take the one-row step) and with the eager ops: same logits within rounding."""
    lm = load_model(source, device="cuda", dtype=dtype)
    want = _prefill_then_decode(lm, EagerOps)
    for ops in (FusedOps, GemvOps):
        for got, wanted in zip(_prefill_then_decode(lm, ops), want, strict=True):
            assert (got - wanted).abs().max() <= tolerance * wanted.abs().max(), ops.__name__
    del lm
    gc.collect()
    torch.cuda.empty_cache()


def _prefill_then_decode(lm, ops):
    cache = PagedKVCache(lm.config, 64, lm.dtype, lm.device)
    model = Llama.from_hf(lm.model)
    model.fused_kernels, model.gemv_kernels = ops is not EagerOps, ops is GemvOps
    runner = ModelRunner(model, cache, cuda_graphs=False)
    allocator = BlockAllocator(cache.num_pages)
    return three_steps(runner, [allocator.allocate(3) for _ in range(3)])


def three_steps(runner: ModelRunner, pages: list[list[int]]):
    """Logits of a prefill of rows of 3, 4 and 5 tokens, a decode step of the 3 rows, then one
    of row 0 alone (3 pages a row). Each step's logits are copied before the next step: from a
    graph they are its output buffer, which graphs captured before it in the same memory pool
    may use for their temporaries when they are replayed."""
    prompts = [[11 + i, 500, 700, 42, 9][:3 + i] for i in range(3)]
    with torch.inference_mode():
        prefill = runner.prefill([Chunk(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)])
        prefill = prefill.to(torch.float32, copy=True)
        decode = runner.decode([Chunk([77], len(p), pg)
                                for p, pg in zip(prompts, pages, strict=True)])
        decode = decode.to(torch.float32, copy=True)
        alone = runner.decode([Chunk([78], len(prompts[0]) + 1, pages[0])])
    return prefill, decode, alone.to(torch.float32, copy=True)
