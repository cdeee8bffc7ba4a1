"""`synthetic:<shape>` models: a public model's real architecture and size, random weights.

Time and memory match the real model (same shapes, same kernels); the text is meaningless.
Weights are built directly on the target device, so a 3B model never passes through host RAM.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

PREFIX = "synthetic:"

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Architecture hyper-parameters copied from each model's published config.json.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_ROPE},
    ),
    "llama-3.2-3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_ROPE},
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "factor": 8.0, **_LLAMA3_ROPE},
    ),
    "phi-3-mini": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
        max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
    # Test shape: the Llama architecture at toy size, fast on any CPU.
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=4096,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
}


def is_synthetic(source: str) -> bool:
    return source.startswith(PREFIX)


def shape_name(source: str) -> str:
    shape = source[len(PREFIX):]
    if shape not in SHAPES:
        raise ValueError(
            f"Unknown synthetic shape {shape!r}. Valid shapes: "
            + ", ".join(PREFIX + name for name in SHAPES)
        )
    return shape


def synthetic_config(shape: str) -> PretrainedConfig:
    params = dict(SHAPES[shape])
    return AutoConfig.for_model(params.pop("model_type"), **params)


def build_synthetic(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight model of `shape`, allocated and initialised on `device`."""
    config = synthetic_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # No early stop: every request generates exactly max_tokens, so timings compare.
    model.generation_config.eos_token_id = None
    return model.eval()
