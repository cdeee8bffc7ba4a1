"""A compact Llama: the whole forward pass the continuous-batching engine runs, in one page.

It loads the same config and weights as Hugging Face's `LlamaForCausalLM` (`Llama.from_hf`) and
gives the same logits (tests/test_continuous.py checks them), but reads and writes its KV cache
in pages (`labkit.engine.kv_cache`), so requests of any length share one batch:

- every token carries its own position (RoPE) and the cache slot its key and value go to;
- every row carries its block table, the pages that hold its earlier tokens;
- attention reads each row's pages and masks what lies after the token's own position.

The same `forward` serves a prefill chunk (many tokens per row) and a decode step (one token per
row), so a decode step's shapes depend only on (rows, pages per row): a few padded sizes, each
replayed from a CUDA graph (`labkit.engine.runner`).

Why these ops: at batch 1 a decode step is a chain of matrix-vector products whose time is the
weights' bytes over memory bandwidth; q/k/v and gate/up are fused into one matrix each so a
layer launches 4 matrix products, not 7, and the CUDA graph removes the launch gaps between
them. Between two products, eager PyTorch launches a kernel for every elementwise operation
(RMSNorm, RoPE's neg/cat/mul/add, the cache write's copies, SiLU, mul, residual adds), each
costing its 2-3 µs even in a graph. So a layer is written as its four products, each with the
elementwise step before or after it (`norm_linear`, `linear`, `silu_linear`; RoPE and the cache
write between qkv and attention), and three implementations run them:

- `EagerOps`: plain PyTorch, a kernel per operation; what runs on the CPU, and what the
  kernels are checked against;
- `FusedOps` (CUDA): one Triton kernel for each stretch between two products
  (`labkit.engine.fused`), the residual add inside the next norm (which is why layers pass
  (x, residual) along), the products by cuBLAS;
- `GemvOps` (CUDA, steps of one token: batch-1 decode): each product one Triton kernel that does
  the elementwise step before it too, the kernels overlapping (`labkit.engine.gemv`).

Every product goes through `quant.linear`, so the same ops run a model whose linear weights are
FP8 (`Llama.from_hf(..., quantization="fp8")`, `labkit.engine.quant`).

The timings are in benchmarks/RESULTS.md ("Continuous batching engine").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.engine import fused, gemv, paged_attention, quant
from labkit.engine.kv_cache import PagedKVCache, write_kv


class Layer(nn.Module):
    """One decoder layer: attention then MLP, each behind an RMSNorm and a residual add."""

    def __init__(self, hf_layer: nn.Module, eps: float):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.eps = eps
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_attention_norm = hf_layer.post_attention_layernorm.weight
        self.qkv = nn.Parameter(torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                           attn.v_proj.weight]), requires_grad=False)
        self.o = attn.o_proj.weight
        self.gate_up = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                    requires_grad=False)
        self.down = mlp.down_proj.weight

    def forward(self, x, residual, index: int, ops, cos, sin, attend: Attend,
                cache: PagedKVCache, slots):
        """x: the previous layer's output, not yet added to `residual` (the sum of every
        output so far; None before the first layer). Returns this layer's (x, residual).
        `ops` does everything but attention: `EagerOps`, `FusedOps` or `GemvOps`."""
        rows, tokens, _ = x.shape
        qkv, residual = ops.norm_linear(x, residual, self.input_norm, self.eps, self.qkv)
        q = ops.rope_write_kv(qkv, cos, sin, cache.kv, index, slots)
        x = ops.linear(attend(q, index).reshape(rows, tokens, -1), self.o)
        gate_up, residual = ops.norm_linear(x, residual, self.post_attention_norm, self.eps,
                                            self.gate_up)
        return ops.silu_linear(gate_up, self.down), residual


class Llama(nn.Module):
    """Llama's forward pass over a paged KV cache. Build it with `from_hf`."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        config, inner = hf_model.config, hf_model.model
        self.config = config
        self.embed = inner.embed_tokens.weight
        self.layers = nn.ModuleList(Layer(layer, config.rms_norm_eps) for layer in inner.layers)
        self.norm, self.eps = inner.norm.weight, config.rms_norm_eps
        self.lm_head = hf_model.lm_head.weight  # the embedding itself when tied
        # RoPE's cos and sin at every position, with the frequencies transformers computed for
        # this config (llama3 scaling too), in float32 then rounded as transformers rounds:
        # a step looks its positions up (2 kernels) instead of computing them (8). For a
        # 131k-token context, 64 MB in bf16.
        angles = (torch.arange(config.max_position_embeddings, device=self.embed.device
                               ).float()[:, None] * inner.rotary_emb.inv_freq.float())
        angles = torch.cat([angles, angles], -1)  # (positions, head_dim): both halves
        scale = float(inner.rotary_emb.attention_scaling)
        for name, table in (("rope_cos", angles.cos()), ("rope_sin", angles.sin())):
            self.register_buffer(name, (table * scale).to(self.embed.dtype), persistent=False)
        self.quantization: str | None = None  # "fp8": the products' weights (`quant`)
        self.decode_kernel = True  # decode attention by `paged_attention` where it can run
        self.fused_kernels = True  # elementwise work by `fused`'s kernels where they can run
        self.gemv_kernels = True  # steps of a few tokens by `gemv`'s kernels where they can run

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf_model: nn.Module, free_source: bool = False,
                quantization: str | None = None, fp8_lm_head: bool = True) -> Llama:
        """The same weights as `hf_model` (a LlamaForCausalLM): shared, except q/k/v and
        gate/up, which are concatenated. `free_source` then empties the Hugging Face copies of
        those, so the two models together hold the weights once (the HF model can no longer
        run a forward pass; its config and generation config stay). `quantization="fp8"`:
        the products' weights (and lm_head's, unless `fp8_lm_head` is false) become FP8 copies
        (`quant.quantize_model`), and `free_source` empties every HF matrix they replace."""
        if hf_model.config.model_type != "llama":
            raise ValueError(f"continuous batching runs the Llama architecture; this model is "
                             f"{hf_model.config.model_type!r}")
        model = cls(hf_model).eval()
        model.quantization = quant.check_method(quantization)
        if model.quantization:
            quant.quantize_model(model, lm_head=fp8_lm_head)
        if free_source:
            for linear in _replaced_linears(hf_model, model):
                linear.weight.data = linear.weight.data.new_empty(0)
        return model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                block_table: torch.Tensor, last: torch.Tensor,
                cache: PagedKVCache, logits: bool = True):
        """Logits (rows, vocab) at column `last` of each row; with `logits` False, that
        column's hidden state as (x, residual), for `logits()` to finish.

        tokens, positions, slots: (rows, tokens per row); block_table: (rows, pages per row).
        A padding token has slot 0 (a page nobody owns) and position 0. `last` None: every
        column, (rows, tokens, vocab), to score a text (benchmarks/fp8_accuracy.py)."""
        x, residual = F.embedding(tokens, self.embed), None
        cos, sin = self._rope_tables(positions)
        ops = self._ops(x.device, tokens.numel())
        if tokens.shape[1] == 1 and self.decode_kernel and paged_attention.available(x.device):
            attend = Attend.paged_kernel(cache, block_table, positions)
        else:
            attend = Attend.gathered(cache, block_table, positions)
        for index, layer in enumerate(self.layers):
            x, residual = layer(x, residual, index, ops, cos, sin, attend, cache, slots)
        if tokens.shape[1] == 1:  # a decode step: each row's one token, as views
            x, residual = x[:, 0], residual[:, 0]
        elif last is not None:
            picked = (torch.arange(len(x), device=x.device), last)
            x, residual = x[picked], residual[picked]
        if not logits:
            return x, residual
        return ops.final_norm_linear(x, residual, self.norm, self.eps, self.lm_head)

    def logits(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The end of `forward(..., logits=False)`: the last norm (after the last residual add)
        and lm_head, for the rows given."""
        ops = self._ops(x.device, len(x))
        return ops.final_norm_linear(x, residual, self.norm, self.eps, self.lm_head)

    def _ops(self, device: torch.device, tokens: int):
        if not (self.fused_kernels and fused.available(device)):
            return EagerOps
        return GemvOps if self.gemv_kernels and gemv.available(device, tokens) else FusedOps

    def _rope_tables(self, positions: torch.Tensor):
        """cos and sin at each token's position: (rows, tokens, 1, head_dim)."""
        return (F.embedding(positions, self.rope_cos)[:, :, None],
                F.embedding(positions, self.rope_sin)[:, :, None])


def _replaced_linears(hf_model: nn.Module, model: Llama) -> list[nn.Module]:
    """The HF linear layers whose weights `model` does not use as they are: q/k/v and gate/up
    (concatenated), and with FP8 weights o, down and an untied lm_head too."""
    replaced = []
    for layer in hf_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        replaced += [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if model.quantization:
            replaced += [attn.o_proj, mlp.down_proj]
    head = hf_model.lm_head
    if isinstance(model.lm_head, quant.Fp8Weight) \
            and head.weight.data_ptr() != model.embed.data_ptr():
        replaced.append(head)
    return replaced


class Attend:
    """Attention of a step's queries over the cache, one way for every layer of the step:
    `attend(q, layer)` with q (rows, tokens, heads, dim) after the step's keys and values are
    written; returns (rows, tokens, heads, dim)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        return self.fn(q, layer)

    @classmethod
    def paged_kernel(cls, cache: PagedKVCache, block_table, positions) -> Attend:
        """Decode (one token per row): the Triton kernel reads the pages in place."""
        lengths = positions[:, 0] + 1

        def attend(q, layer):
            k, v = cache.kv[layer].unbind(0)
            return paged_attention.decode_attention(q[:, 0], k, v, block_table, lengths)[:, None]
        return cls(attend)

    @classmethod
    def gathered(cls, cache: PagedKVCache, block_table, positions) -> Attend:
        """Any step: copy each row's pages side by side (`PagedKVCache.read`), then SDPA with a
        mask. Key j of a row is visible to a token at position p when j <= p: causal within
        the chunk, everything cached before it, nothing in unused page space."""
        rows, tokens = positions.shape
        kv_heads, group = cache.kv_heads, cache.heads // cache.kv_heads
        keys = torch.arange(block_table.shape[1] * cache.page_size, device=positions.device)
        # (rows, 1, group × tokens, keys): the same mask for each query head of a group
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None].repeat(1, 1, group, 1)

        def attend(q, layer):
            k, v = cache.read(layer, block_table, q.dtype)  # (rows, kv_heads, keys, dim)
            # Grouped-query attention: the `group` query heads that share a KV head attend as
            # group × tokens queries of that one head, so no KV head is copied `group` times.
            dim = q.shape[-1]
            q = q.reshape(rows, tokens, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
            out = F.scaled_dot_product_attention(
                q.reshape(rows, kv_heads, group * tokens, dim), k, v, attn_mask=mask)
            return out.view(rows, kv_heads, group, tokens, dim).permute(0, 3, 1, 2, 4)
        return cls(attend)


class EagerOps:
    """Everything a layer does but attention, in plain PyTorch ops, a kernel each, on any
    device: the matrix products, each with the elementwise step before or after it. On CUDA
    the model runs `FusedOps` or `GemvOps` instead, the same functions in fewer kernels."""

    @staticmethod
    def add_rms_norm(x, residual, weight, eps):
        """(RMSNorm(x + residual), x + residual); with no residual yet, x is the sum."""
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x

    @staticmethod
    def rope_write_kv(qkv, cos, sin, kv, layer: int, slots):
        """q after RoPE, from a qkv product (rows, tokens, (heads + 2 kv_heads) × dim); k after
        RoPE and v go to the cache `kv` at `slots`."""
        rows, tokens, width = qkv.shape
        kv_heads, dim = kv.shape[-2:]
        qkv = qkv.view(rows, tokens, width // dim, dim)
        heads = width // dim - 2 * kv_heads
        # RoPE turns q and k alike: one pass over both, which sit side by side in qkv.
        qk = rope(qkv[:, :, :heads + kv_heads], cos, sin)
        write_kv(kv, layer, qk[:, :, heads:], qkv[:, :, heads + kv_heads:], slots)
        return qk[:, :, :heads]

    @staticmethod
    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    @classmethod
    def norm_linear(cls, x, residual, norm, eps, weight):
        """(RMSNorm(x + residual) @ weight.T, x + residual). Every product here is
        `quant.linear`: `x @ weight.T`, or the FP8 recipes for an FP8 weight."""
        h, residual = cls.add_rms_norm(x, residual, norm, eps)
        return quant.linear(h, weight), residual

    @classmethod
    def final_norm_linear(cls, x, residual, norm, eps, weight):
        return cls.norm_linear(x, residual, norm, eps, weight)[0]

    linear = staticmethod(quant.linear)

    @classmethod
    def silu_linear(cls, gate_up, weight):
        """(SiLU(gate) · up) @ weight.T."""
        return quant.linear(cls.silu_mul(gate_up), weight)


class FusedOps(EagerOps):
    """The elementwise steps as `fused`'s Triton kernels, the products by cuBLAS; before an
    FP8 product on the tensor cores, the norm or SiLU kernel writes its input quantized."""

    add_rms_norm = staticmethod(fused.add_rms_norm)
    rope_write_kv = staticmethod(fused.rope_write_kv)
    silu_mul = staticmethod(fused.silu_mul)

    @classmethod
    def norm_linear(cls, x, residual, norm, eps, weight):
        if not quant.takes_quantized_input(weight):
            return super().norm_linear(x, residual, norm, eps, weight)
        q, scale, residual = quant.add_rms_norm_fp8(x, residual, norm, eps)
        out = quant.quantized_mm(q, scale, weight, x.dtype)
        return out.view(*x.shape[:-1], -1), residual

    @classmethod
    def silu_linear(cls, gate_up, weight):
        if not quant.takes_quantized_input(weight):
            return super().silu_linear(gate_up, weight)
        q, scale = quant.silu_mul_fp8(gate_up)
        return quant.quantized_mm(q, scale, weight, gate_up.dtype).view(
            *gate_up.shape[:-1], -1)


def _weight_parts(op):
    """`op` (a `gemv` op, its weight last) taking an FP8 weight as its values and scales."""
    return staticmethod(lambda *args: op(*args[:-1], *quant.parts(args[-1])))


class GemvOps(FusedOps):
    """Steps of a few tokens: each product a `gemv` kernel that does the elementwise step
    before it too, the kernels overlapping one another."""

    norm_linear = _weight_parts(gemv.norm_linear)
    final_norm_linear = _weight_parts(gemv.final_norm_linear)
    linear = _weight_parts(gemv.linear)
    silu_linear = _weight_parts(gemv.silu_linear)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the scale, in one fused kernel (float32 inside)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, in Llama's half-split layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
