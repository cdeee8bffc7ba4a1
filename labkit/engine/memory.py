"""Where the GPU memory goes: weights + KV cache, estimated from the config and measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GB = 1e9  # memory figures are decimal GB, like nvidia-smi's MiB are not: say which when printing
KIB = 1024


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers; tied weights are counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, tied weights counted once (what `model.num_parameters()` reports)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """2 (K and V) × layers × kv_heads × head_dim × bytes per element."""
    return 2 * config.num_hidden_layers * _attention_widths(config)[1] * dtype_bytes(dtype)


def kv_cache_bytes(config, dtype: torch.dtype, batch_size: int, seq_len: int) -> int:
    return kv_cache_bytes_per_token(config, dtype) * batch_size * seq_len


@dataclass
class MeasuredMemory:
    """GPU memory as torch's allocator and the driver see it (bytes); None without a GPU."""

    torch_allocated: int | None
    torch_reserved: int | None
    nvml_used: int | None
    total: int | None


def measure_gpu_memory(device: torch.device) -> MeasuredMemory:
    if device.type != "cuda":
        return MeasuredMemory(None, None, None, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(index)
    free, total = torch.cuda.mem_get_info(index)
    return MeasuredMemory(
        torch_allocated=torch.cuda.memory_allocated(index),
        torch_reserved=torch.cuda.memory_reserved(index),
        nvml_used=total - free,  # the driver's view: everything on the card, all processes
        total=total,
    )


@dataclass
class MemoryReport:
    """Estimate next to measurement, for one loaded model."""

    model: str
    dtype: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    measured: MeasuredMemory

    def kv_cache_bytes(self, batch_size: int, seq_len: int) -> int:
        return self.kv_bytes_per_token * batch_size * seq_len

    def as_dict(self) -> dict:
        return asdict(self)

    def kv_table(self, shapes: list[tuple[int, int]]) -> str:
        """KV cache and weights + KV cache for each (batch, context) shape, and their share
        of the card when a GPU was measured."""
        total = self.measured.total
        lines = [f"{'batch':>6} {'context':>8} {'KV cache':>10}   weights + KV"
                 + ("   share of this card" if total else "")]
        for batch, context in shapes:
            kv = self.kv_cache_bytes(batch, context)
            line = (f"{batch:>6} {context:>8} {kv / GB:>8.2f} GB   "
                    f"{(self.weight_bytes + kv) / GB:>8.2f} GB")
            if total:
                line += f"   {(self.weight_bytes + kv) / total:>6.0%}"
            lines.append(line)
        return "\n".join(lines)

    def peak_lines(self, sequence_tokens: int, peak: int | None,
                   card_used: int | None) -> str:
        """One generation's measured peak (torch allocated) next to weights + its KV cache."""
        estimate = self.weight_bytes + self.kv_cache_bytes(1, sequence_tokens)
        lines = [f"estimate (weights + KV cache): {estimate / GB:.3f} GB"]
        if peak is None:
            lines.append("measured peak: no GPU in CPU mode, so there is no GPU memory to "
                         "measure")
        else:
            lines.append(f"measured peak, torch allocated: {peak / GB:.3f} GB "
                         f"({peak / estimate - 1:+.1%} vs estimate)")
            lines.append(f"driver (NVML) view of the whole card now: {card_used / GB:.2f} GB "
                         "used")
        return "\n".join(lines)

    def table(self, batch_size: int = 1, seq_len: int = 170) -> str:
        m = self.measured
        kv = self.kv_cache_bytes(batch_size, seq_len)
        rows = [
            ("parameters", f"{self.parameters / 1e9:.2f} B" if self.parameters > 1e8
             else f"{self.parameters / 1e6:.2f} M"),
            (f"weights ({self.dtype})", _gb(self.weight_bytes)),
            ("KV cache per token", f"{self.kv_bytes_per_token / KIB:.1f} KiB"),
            (f"KV cache, batch {batch_size} × {seq_len} tokens", _gb(kv)),
            ("estimate: weights + KV cache", _gb(self.weight_bytes + kv)),
        ]
        if m.torch_allocated is None:
            rows.append(("measured GPU memory", "no GPU: nothing to measure"))
        else:
            rows += [
                ("measured: torch allocated", _gb(m.torch_allocated)),
                ("measured: torch reserved", _gb(m.torch_reserved)),
                ("measured: driver (NVML) used, whole card", _gb(m.nvml_used)),
                ("card total", _gb(m.total)),
            ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _gb(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GB:.3f} GB" if n < 0.1 * GB else f"{n / GB:.2f} GB"


def _attention_widths(config) -> tuple[int, int]:
    """Outputs of the q projection and of each of k and v (grouped-query attention)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads * head_dim(config), kv_heads * head_dim(config)


def parameter_count_from_config(config) -> int:
    """Parameters of a Llama-style decoder (Llama, Phi-3, …) computed from its config alone.

    Lets a learner (and `labkit.course.answers`) size a model before loading it: embeddings,
    per layer attention (q, k, v, o) + gated MLP (gate, up, down) + two RMSNorms, a final norm,
    and the LM head unless it is tied to the embeddings. Phi-3's fused qkv/gate_up have the
    same counts.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    q_width, kv_width = _attention_widths(config)
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    if getattr(config, "attention_bias", False):
        attention += q_width + 2 * kv_width + hidden
    mlp = 3 * hidden * config.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + hidden
    per_layer = attention + mlp + 2 * hidden
    embeddings = config.vocab_size * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * hidden
    return embeddings + layers * per_layer + hidden + lm_head


def fp8_step_bytes_from_config(config, norm_bytes: int = 2) -> int:
    """Bytes a one-token decode step reads with FP8 weights (`labkit.engine.quant`), from the
    config alone: each product's matrix (q, k, v, o, gate, up, down; lm_head) one byte a weight
    plus a float32 scale per output channel, the norms in the model's dtype (`norm_bytes`);
    not the embedding table (a step reads one row of it). `quant.step_read_bytes` counts the
    same on a built model."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    q_width, kv_width = _attention_widths(config)
    products = [(q_width + 2 * kv_width, hidden), (hidden, q_width),  # (outputs, inputs)
                (2 * config.intermediate_size, hidden), (hidden, config.intermediate_size)]
    per_layer = sum(n * k + 4 * n for n, k in products) + 2 * hidden * norm_bytes
    lm_head = config.vocab_size * hidden + 4 * config.vocab_size
    return layers * per_layer + lm_head + hidden * norm_bytes


def peak_gpu_bytes_during(fn, device: torch.device):
    """Run `fn()`; return (its result, peak torch-allocated bytes during it, or None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device)
