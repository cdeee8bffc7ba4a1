"""Memory accounting against figures computed by hand from the published configs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from labkit.engine import memory
from labkit.engine.synthetic import synthetic_config


@pytest.fixture(scope="module")
def llama_3b_meta():
    """The real llama-3.2-3b architecture on the meta device: shapes without memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(synthetic_config("llama-3.2-3b"),
                                                dtype=torch.bfloat16)


def test_llama_3b_parameters_and_weights(llama_3b_meta):
    # embeddings 128256×3072 (tied, counted once) + 28 layers × 100.66 M + final norm
    assert memory.parameter_count(llama_3b_meta) == 3_212_749_824
    bytes_bf16 = memory.parameter_count(llama_3b_meta) * 2
    assert round(bytes_bf16 / 1e9, 2) == 6.43


def test_kv_cache_per_token_llama_3b():
    # 2 (K,V) × 28 layers × 8 kv heads × 128 head_dim × 2 bytes = 114,688 B = 112 KiB
    config = synthetic_config("llama-3.2-3b")
    assert memory.kv_cache_bytes_per_token(config, torch.bfloat16) == 112 * 1024
    assert memory.kv_cache_bytes(config, torch.bfloat16, batch_size=4, seq_len=1000) == (
        4 * 1000 * 112 * 1024)


def test_kv_cache_other_shapes():
    assert memory.kv_cache_bytes_per_token(synthetic_config("llama-3.1-8b"), torch.bfloat16) == (
        2 * 32 * 8 * 128 * 2)
    # phi-3-mini has no GQA: 32 kv heads of 96
    assert memory.kv_cache_bytes_per_token(synthetic_config("phi-3-mini"), torch.float16) == (
        2 * 32 * 32 * 96 * 2)
    assert memory.kv_cache_bytes_per_token(synthetic_config("tiny"), torch.float32) == (
        2 * 2 * 2 * 16 * 4)


def test_weight_bytes_counts_tied_weights_once():
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(synthetic_config("tiny"), dtype=torch.float32)
    params = memory.parameter_count(model)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weight_bytes(model) == params * 4 + buffers


def test_report_without_gpu_says_so():
    report = memory.MemoryReport("m", "float32", 10, 40, 8, memory.MeasuredMemory(None, None,
                                                                                  None, None))
    text = report.table(batch_size=2, seq_len=10)
    assert "no GPU" in text
    assert report.kv_cache_bytes(2, 10) == 160
