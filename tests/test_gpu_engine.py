"""GPU checks for model loading and timed generation (run on a GPU machine: pytest -m gpu)."""

import pytest
import torch

from labkit.engine import hf_generate, memory
from labkit.engine.model import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def allocated_before():
    """What earlier test modules left allocated on the GPU (not this model's)."""
    return torch.cuda.memory_allocated()


@pytest.fixture(scope="module")
def lm(allocated_before):
    model = load_model("synthetic:llama-3.2-3b")
    yield model
    del model
    torch.cuda.empty_cache()


def test_auto_picks_gpu_and_bf16(lm):
    assert lm.device.type == "cuda" and lm.dtype == torch.bfloat16


def test_synthetic_3b_memory_matches_estimate(lm, allocated_before):
    report = lm.memory_report()
    assert report.parameters == 3_212_749_824
    assert round(report.weight_bytes / 1e9, 2) == 6.43
    assert report.kv_bytes_per_token == 112 * 1024
    # built directly on the GPU: loading added the weights and little else
    loaded = report.measured.torch_allocated - allocated_before
    assert loaded == pytest.approx(report.weight_bytes, rel=0.02)
    assert report.measured.nvml_used >= report.measured.torch_reserved


def test_weights_were_built_on_the_gpu_not_the_cpu(lm):
    assert all(p.device.type == "cuda" for p in lm.model.parameters())


def test_generate_150_tokens_with_consistent_timing(lm):
    hf_generate.warmup(lm)
    r = hf_generate.generate(lm, "Suggest a skincare routine", max_tokens=150, temperature=0)
    assert r.tokens_generated == 150 and r.synthetic and r.device == "cuda"
    assert 0 < r.time_to_first_token_ms < r.inference_time_ms
    # decode of a 3B model at batch 1 on a modern GPU: between the bandwidth floor and 200 ms
    assert 1 < r.time_per_output_token_ms < 200


def test_kv_cache_grows_as_predicted(lm):
    r, peak = memory.peak_gpu_bytes_during(
        lambda: hf_generate.generate(lm, "hello", max_tokens=150, temperature=0), lm.device)
    report = lm.memory_report()
    kv = report.kv_cache_bytes(1, r.prompt_tokens + r.tokens_generated)
    assert peak >= report.weight_bytes + kv
