"""Exercise set 01 (memory): parameters, weights, the KV cache."""

from __future__ import annotations

import copy

from labkit.course.answers.verdict import (
    CheckResult,
    _compare,
    _config,
    _count,
    _dtype_bytes,
    _finish,
    _gib_mixup,
    _unit,
)
from labkit.engine import memory


def parameter_count(answer, shape: str) -> CheckResult:
    """Parameters of the model `shape` (e.g. "llama-3.2-3b"), counted from its config."""
    config = _config(shape)
    expected = memory.parameter_count_from_config(config)
    embed = config.vocab_size * config.hidden_size
    mistakes = [(expected + embed, "The LM head shares its weights with the embeddings "
                 "(tie_word_embeddings=True): count that matrix once.")
                if config.tie_word_embeddings else
                (expected - embed, "This model has a separate LM head (tie_word_embeddings="
                 "False): count vocab_size × hidden_size twice."),
                (_count_with_full_kv_heads(config), "K and V projections have "
                 "num_key_value_heads × head_dim outputs (grouped-query attention), "
                 "not num_attention_heads × head_dim.")]
    return _finish(_compare(
        "parameter_count", answer, expected, unit="parameters", rel_tol=0.01, mistakes=mistakes,
        hint="embeddings (vocab × hidden) + per layer: q, k, v, o projections, the MLP's gate, "
             "up and down (3 × hidden × intermediate), two norms (hidden each); a final norm; "
             "an LM head only if it is not tied."))


def _count_with_full_kv_heads(config) -> int:
    full = copy.deepcopy(config)
    full.num_key_value_heads = config.num_attention_heads
    return memory.parameter_count_from_config(full)


def weight_memory(answer, shape: str, dtype="bfloat16", unit: str = "GB") -> CheckResult:
    """Memory of the weights of `shape` in `dtype`, in `unit` (GB = 10^9 bytes by default)."""
    config = _config(shape)
    params = memory.parameter_count_from_config(config)
    per = _dtype_bytes(dtype)
    scale = _unit(unit)
    n_bytes = params * per
    mistakes = [
        (params * 4 / scale, f"That is 4 bytes per parameter (float32); {dtype} has {per}."),
        (params * 2 / scale, f"That is 2 bytes per parameter; {dtype} has {per}."),
        (params / scale, f"That is 1 byte per parameter; {dtype} has {per} bytes per element."),
        (n_bytes * 8 / scale, "That is bits, not bytes: one byte is 8 bits."),
        (params / 1e9, "That is the parameter count in billions; multiply by the bytes per "
                       "parameter to get memory."),
        *_gib_mixup(n_bytes, unit),
    ]
    return _finish(_compare(
        "weight_memory", answer, n_bytes / scale, unit=unit, rel_tol=0.02, mistakes=mistakes,
        hint="parameters × bytes per parameter (bfloat16/float16: 2, float32: 4); count the "
             "parameters from the config (tied embeddings once)."))


def kv_cache_size(answer, shape: str, context_tokens: int, batch_size: int = 1,
                  dtype="bfloat16", unit: str = "GB") -> CheckResult:
    """KV-cache memory of `shape` for `batch_size` sequences of `context_tokens` tokens."""
    import torch

    from labkit.engine.model import resolve_dtype

    config = _config(shape)
    tokens = _count("context_tokens", context_tokens)
    batch = _count("batch_size", batch_size)
    _dtype_bytes(dtype)  # validates dtype with a clear message
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    scale = _unit(unit)
    n_bytes = memory.kv_cache_bytes(config, torch_dtype, batch, tokens)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mistakes = [
        (n_bytes / 2 / scale, "Count both K and V: the cache stores two tensors per layer."),
        (n_bytes / config.num_hidden_layers / scale, "Every layer keeps its own K and V: "
                                                     "multiply by num_hidden_layers."),
        (n_bytes * heads / kv_heads / scale, "Grouped-query attention: the cache holds "
         f"num_key_value_heads ({kv_heads}) heads, not num_attention_heads ({heads})."),
        *_gib_mixup(n_bytes, unit),
    ]
    if batch > 1:
        mistakes.append((n_bytes / batch / scale, f"Each of the {batch} sequences has its own "
                                                  "cache: multiply by the batch size."))
    return _finish(_compare(
        "kv_cache_size", answer, n_bytes / scale, unit=unit, rel_tol=0.02, mistakes=mistakes,
        hint="2 (K and V) × layers × kv_heads × head_dim × bytes per element, per token; "
             "then × tokens × batch size."))
