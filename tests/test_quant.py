"""FP8 weights (`labkit.engine.quant`) on the CPU: the quantize/dequantize round trip stays
within e4m3's rounding, each output channel has its own scale, the eager FP8 path's logits stay
close to the model's own on the embedded model (W8A16 and the W8A8 arithmetic), greedy results
keep their shape, `labkit serve --quantization` refuses what it cannot run, and the Triton
kernels (FP8 GEMV, per-token quantization) run under Triton's interpreter where Triton is
installed. On the GPU: tests/test_gpu_quant.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from labkit import cli
from labkit.engine import gemv, quant
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.request import Request
from labkit.engine.runner import Chunk, ModelRunner, unpack
from labkit.serve.cli import QUANTIZATIONS

E4M3_HALF_ULP = 2.0 ** -4  # 3 mantissa bits: rounding moves a normal value by at most 1/16
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # subnormal spacing 2^-9 (in units of the scale)
TEXT = ("User: Suggest a skincare routine for dry skin in winter\nAssistant: Here is a simple "
        "daily routine that suits most skin types. Morning routine: 1. Cleanser: a mild gel "
        "cleanser.")


def test_round_trip_stays_within_e4m3_rounding():
    torch.manual_seed(0)
    weight = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]  # rows of every size
    weight[3, 7] = 1e-9  # far below the row's max: an e4m3 subnormal, or zero
    q, scale = quant.quantize_weight(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    error = (quant.dequantize(q, scale) - weight).abs()
    bound = torch.maximum(weight.abs() * E4M3_HALF_ULP, scale[:, None] * E4M3_SUBNORMAL_HALF_STEP)
    assert (error <= bound * (1 + 1e-6)).all()
    # each row's largest value lands on ±448 exactly, so it round-trips exactly
    biggest = weight.abs().argmax(1)
    assert (q.float().abs().gather(1, biggest[:, None]) == quant.FP8_MAX).all()


def test_each_output_channel_has_its_own_scale():
    torch.manual_seed(1)
    weight = torch.randn(16, 128)
    q, scale = quant.quantize_weight(weight)
    torch.testing.assert_close(scale, weight.abs().amax(1) / 448, rtol=0, atol=0)
    louder = weight.clone()
    louder[5] *= 1000  # one loud channel does not coarsen the others
    q2, scale2 = quant.quantize_weight(louder)
    others = torch.arange(16) != 5
    assert torch.equal(q2[others].float(), q[others].float())
    assert torch.equal(scale2[others], scale[others])
    torch.testing.assert_close(scale2[5], scale[5] * 1000)
    zeros = quant.quantize_weight(torch.zeros(2, 32))  # padding rows: finite, exact zeros
    assert (zeros[0].float() == 0).all() and (zeros[1] == quant.MIN_SCALE).all()


def test_the_three_recipes_agree_within_their_rounding():
    torch.manual_seed(2)
    x, weight = torch.randn(2, 5, 96), torch.randn(48, 96) * 0.1
    fp8 = quant.Fp8Weight(weight, matmul="dequant")
    exact = x @ quant.dequantize(fp8.q, fp8.scale).T
    torch.testing.assert_close(quant.linear(x, fp8), exact, rtol=1e-5, atol=1e-5)
    fp8.matmul = "scaled_mm"  # the inputs rounded to e4m3 too: a few % off
    w8a8 = quant.linear(x, fp8)
    assert w8a8.shape == exact.shape
    assert (w8a8 - exact).norm() / exact.norm() < 0.05
    assert torch.equal(quant.linear(x, weight), x @ weight.T)  # a plain weight: as before


def test_the_emulated_w8a8_matches_torch_scaled_mm_where_the_cpu_has_it():
    """The CPU's eager W8A8 arithmetic against torch's own `_scaled_mm` (CPU kernel, torch
    2.13 and later), called with the very arguments CUDA gets: mat2 column-major, scales
    (M, 1) and (1, N) float32."""
    torch.manual_seed(3)
    x, fp8 = torch.randn(7, 64), quant.Fp8Weight(torch.randn(32, 64))
    xq, x_scale = quant.quantize_rows(x)
    try:
        got = torch._scaled_mm(xq, fp8.q.t(), scale_a=x_scale, scale_b=fp8.scale[None],
                               out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm: {err}")
    torch.testing.assert_close(quant.scaled_mm(x, fp8), got, rtol=1e-5, atol=1e-4)


def test_fp8_gemv_tiles_are_the_measured_ones_and_bf16_keeps_its_rule():
    """FP8: the 3B products' measured bests, else the narrow one-stage tile (the H100 sweep);
    bf16 and float32 keep the rule measured for them."""
    assert gemv.tile(5120, 3072, itemsize=1) == gemv.FP8_CONFIGS[5120, 3072]
    for n, k in ((2048, 2048), (4096, 14336), (200, 1000)):
        assert gemv.tile(n, k, itemsize=1) == (4, 1024, 4, 1)
    assert gemv.tile(3072, 8192) == (8, 1024, 8, 2) and gemv.tile(5120, 3072) == (4, 1024, 4, 2)
    assert gemv.tile(3072, 8192, itemsize=4) == gemv.tile(3072, 8192)


def logits(model, lm, ids: list[int]) -> torch.Tensor:
    """Every position's logits of `ids`, prefilled at once."""
    pages = -(-len(ids) // 16)
    cache = PagedKVCache(lm.config, pages + 1, lm.dtype, lm.device)
    packed = ModelRunner(model, cache)._pack([Chunk(ids, 0, list(range(1, pages + 1)))], 1,
                                             len(ids), pages)
    with torch.inference_mode():
        return model(*unpack(packed, len(ids))[:4], None, cache)[0]


@pytest.mark.parametrize("matmul", quant.MATMULS)
@pytest.mark.parametrize("fp8_lm_head", [True, False])
def test_eager_fp8_logits_stay_close_to_the_models_own(lm, matmul, fp8_lm_head):
    ids = lm.tokenizer(TEXT).input_ids
    want = logits(Llama.from_hf(lm.model), lm, ids)
    model = Llama.from_hf(lm.model, quantization="fp8", fp8_lm_head=fp8_lm_head)
    quant.set_matmul(model, matmul)
    assert isinstance(model.lm_head, quant.Fp8Weight) == fp8_lm_head
    assert not isinstance(model.embed, quant.Fp8Weight)  # embeddings stay in the model's dtype
    got = logits(model, lm, ids)
    assert got.shape == want.shape
    assert (got - want).norm() / want.norm() < 0.05  # measured: 1.0-2.2 %
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_fp8_halves_what_a_step_reads_and_frees_the_replaced_matrices(lm):
    hf = type(lm.model)(lm.config)  # a copy to empty: the fixture's model stays whole
    hf.load_state_dict(lm.model.state_dict())
    plain = quant.step_read_bytes(Llama.from_hf(lm.model))
    model = Llama.from_hf(hf, free_source=True, quantization="fp8")
    config = lm.config
    layer = model.layers[0]
    products = sum(getattr(layer, name).q.numel() for name in quant.LINEARS)
    channels = sum(getattr(layer, name).q.shape[0] for name in quant.LINEARS)
    norms = 2 * config.hidden_size * config.num_hidden_layers + config.hidden_size
    lm_head = config.vocab_size * config.hidden_size
    assert quant.step_read_bytes(model) == (
        config.num_hidden_layers * (products + 4 * channels) + 4 * norms
        + lm_head + 4 * config.vocab_size)
    assert quant.step_read_bytes(model) < plain / 3  # float32 on the CPU: a quarter, and scales
    assert hf.model.layers[0].self_attn.o_proj.weight.numel() == 0
    assert hf.model.layers[0].mlp.down_proj.weight.numel() == 0
    assert hf.model.embed_tokens.weight.numel() > 0  # tied to lm_head: the embeddings stay
    assert model.embed.numel() == config.vocab_size * config.hidden_size


def test_the_fp8_step_bytes_from_a_config_are_those_of_the_built_model(tiny):
    """What exercise 2.5 checks against (`memory.fp8_step_bytes_from_config`) counts what
    `quant.step_read_bytes` counts on the model itself: every product, lm_head, the norms."""
    from labkit.engine import memory

    model = Llama.from_hf(tiny.model, quantization="fp8")
    assert memory.fp8_step_bytes_from_config(tiny.config, norm_bytes=4) == \
        quant.step_read_bytes(model)


def test_greedy_results_keep_their_shape(lm):
    """How often greedy text matches, and for how long, is measured, not asserted:
    benchmarks/fp8_accuracy.py (a near-tie can flip the 4th token of a prompt here)."""
    def run(quantization):
        cache = PagedKVCache(lm.config, 64, lm.dtype, lm.device)
        model = Llama.from_hf(lm.model, quantization=quantization)
        requests = [Request(p, n, 0, ignore_eos=True) for p, n in
                    (("Suggest a skincare routine", 24), ("Oily skin", 9))]
        return ContinuousEngine(lm, model, cache).generate(requests)

    plain, fp8 = run(None), run("fp8")
    assert [r.tokens_generated for r in fp8] == [r.tokens_generated for r in plain] == [24, 9]
    assert all(r.generated_text for r in fp8)


def test_unknown_methods_and_gpus_without_fp8_tensor_cores_are_refused(lm, monkeypatch):
    with pytest.raises(ValueError, match="'int4' is not supported; use one of none, fp8"):
        Llama.from_hf(lm.model, quantization="int4")
    assert quant.check_method("none") is None and quant.check_method("fp8") == "fp8"
    quant.check_supported(torch.device("cpu"))  # the eager path: allowed
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"NVIDIA A100-SXM4-80GB is 8\.0\. Supported on this "
                                         r"GPU: --quantization none"):
        quant.check_supported("auto")
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    quant.check_supported("cuda")


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_serve_lists_the_supported_methods_and_refuses_fp8_where_it_cannot_run(
        monkeypatch, capsys):
    assert QUANTIZATIONS == quant.METHODS
    with pytest.raises(SystemExit):
        cli.main(["serve", "--mode", "continuous", "--quantization", "int4"])
    assert re.search(r"invalid choice: 'int4' \(choose from '?none'?, '?fp8'?\)",
                     capsys.readouterr().err)  # quoted or not, by Python version
    assert cli.main(["serve", "--model", "no-such-model", "--quantization", "fp8"]) == 2
    assert "--quantization applies only to --mode continuous" in capsys.readouterr().err
    fake_gpu(monkeypatch, (8, 6), "NVIDIA RTX A6000")
    assert cli.main(["serve", "--model", "no-such-model", "--mode", "continuous",
                     "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--quantization fp8 needs FP8 tensor cores" in err and "is 8.6" in err
    assert "Supported methods: none, fp8" in err


INTERPRETED = textwrap.dedent("""
    import json, torch
    from labkit.engine import gemv, quant
    torch.manual_seed(0)
    out = {}
    # FP8 GEMV against the dequantized weight: a ragged K (masks), each prologue
    n, k = 24, 1024 + 320
    fp8 = quant.Fp8Weight(torch.randn(n, k) * 0.05)
    w = quant.dequantize(fp8.q, fp8.scale)
    x = torch.randn(1, 2 * k).to(torch.bfloat16)
    res, norm = torch.randn(1, k).to(torch.bfloat16), (torch.rand(k) + 0.5).to(torch.bfloat16)
    from labkit.engine.llama import EagerOps as E
    cases = {
        "none": (gemv.linear(x[:, :k], fp8.q, fp8.scale), x[:, :k].float() @ w.T),
        "silu": (gemv.silu_linear(x, fp8.q, fp8.scale), E.silu_mul(x).float() @ w.T),
        "norm": (gemv.norm_linear(x[:, :k], res, norm, 1e-5, fp8.q, fp8.scale)[0],
                 E.add_rms_norm(x[:, :k], res, norm, 1e-5)[0].float() @ w.T),
    }
    for name, (got, want) in cases.items():
        out[name] = float((got.float() - want).abs().max() / want.abs().max())
    # per-token quantization: inputs whose quotients are e4m3 values already (each row's max
    # 448 × a power of two), so no rounding is involved (the interpreter's own conversion
    # rounds carries wrongly; the GPU test checks the rounding)
    values = torch.randn(6, 700).mul(40).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    values[:, 3] = 448.0
    rows = values * 2.0 ** torch.arange(-3, 3).float()[:, None]
    q, scale = quant.quantize_rows_kernel(rows)
    out["rows_exact"] = bool(torch.equal(q.float(), values)
                             and torch.equal(scale[:, 0], 2.0 ** torch.arange(-3, 3).float()))
    print(json.dumps(out))
""")


def test_triton_kernels_under_the_interpreter():
    """The FP8 GEMV kernels and the per-token quantization kernel on the CPU, by Triton's
    interpreter, in a process of its own (TRITON_INTERPRET is read when kernels are defined)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("rows_exact")
    for name, relative in out.items():  # bf16 outputs: a rounding step of the largest
        assert relative < 1e-2, (name, relative)


def test_a_gpu_that_refuses_the_fp8_tensor_core_product_serves_the_dequantizing_fallback(
        monkeypatch, caplog):
    """Where `torch._scaled_mm` refuses the model's shapes, products of many tokens dequantize
    (correct under CUDA graphs: tests/test_gpu_quant.py, H100), and the log says why and what
    it costs."""
    weight = SimpleNamespace(q=SimpleNamespace(is_cuda=True, device="cpu"), shape=(32, 16))
    model = SimpleNamespace(embed=torch.zeros(1, dtype=torch.bfloat16))
    monkeypatch.setattr(quant, "fp8_weights", lambda m: [weight])

    def refuses(x, w):
        raise RuntimeError("rowwise scaling is not supported on this device\nmore")

    monkeypatch.setattr(quant, "scaled_mm", refuses)
    with caplog.at_level("WARNING", logger="labkit.engine.quant"):
        assert quant.pick_matmul(model) == "dequant"
    assert re.search(r"shape \(32, 16\) \(RuntimeError: rowwise scaling is not supported on "
                     r"this device\).*dequantize the weights to bfloat16.*--quantization none",
                     caplog.text)
