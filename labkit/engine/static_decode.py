"""Batched decode steps over a static KV cache, replayed from a CUDA graph on a GPU.

Batching fixes half of the waste: one decode step reads the weights once for every row. The other
half is the launch gap. A decode step of a 3B Llama is hundreds of small kernels, and eager
PyTorch takes longer to launch them from Python than the GPU takes to run them (an eager step took
21 ms at batch 1 on an H100, the GPU busy a fraction of it: benchmarks/RESULTS.md, "Where the time
goes"), so the GPU still waits most of each step. A CUDA graph records the step's kernels once
and replays them with a single launch (what vLLM and gpt-fast do for decoding).

A graph replays fixed shapes at fixed addresses, so each (batch, cache length) shape gets its own
`transformers.StaticCache`, static input buffers and captured graph. A batch of n rows runs at the
next power of two ≥ n rows; the extra rows are padding that attends only to itself. Rows that
finish keep decoding (the graph's shape is fixed); their tokens are ignored.

The attention mask is built here as a 4D additive mask (transformers uses a 4D mask as given), so
nothing in the step reads a tensor on the host, which a graph capture cannot do. The prefill runs
eagerly, like the decode steps on a CPU (capture=False), which is how tests check this path.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict

import torch
from transformers import StaticCache

from labkit.engine import memory
from labkit.engine.model import LoadedModel

MIN_CACHE_LEN = 256  # short requests share one cache length: fewer shapes, fewer graphs


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up: cuBLAS keeps a workspace for
    each stream it has run on, so a new stream per graph would leak one workspace per graph."""
    return torch.cuda.Stream(device)


def last_logits_only(model: torch.nn.Module) -> dict:
    """Prefill keyword that skips the vocabulary projection for all but the last position,
    where the model accepts it (B × prompt × vocab logits would otherwise dominate prefill
    memory)."""
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class StaticDecoder:
    """A static KV cache for `batch` rows of up to `cache_len` tokens: `prefill` (eager), then
    `step` per token, captured into a CUDA graph at the first step when `capture` is true."""

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int,
                 device: torch.device, dtype: torch.dtype, capture: bool) -> None:
        self.model, self.batch, self.cache_len, self.capture = model, batch, cache_len, capture
        self.prefill_kwargs = last_logits_only(model)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.tokens)
        self.blocked = torch.finfo(dtype).min
        self.mask = torch.full((batch, 1, 1, cache_len), self.blocked, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.length = 0  # cache slots in use
        self.live: torch.Tensor | None = None  # rows still generating (None: all n rows)
        self.rows = 0

    @property
    def cache_bytes(self) -> int:
        return memory.kv_cache_bytes(self.model.config, self.mask.dtype, self.batch,
                                     self.cache_len)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Run the (left-padded) prompts of n ≤ batch rows; logits of each row's last token."""
        n, width = input_ids.shape
        if n > self.batch or width >= self.cache_len:
            raise ValueError(f"{n} rows of {width} tokens do not fit a {self.batch} x "
                             f"{self.cache_len} cache")
        device = self.tokens.device
        ids = torch.zeros((self.batch, width), dtype=torch.long, device=device)
        positions = torch.zeros_like(ids)
        valid = torch.zeros((self.batch, self.cache_len), dtype=torch.bool, device=device)
        ids[:n], positions[:n], valid[:n, :width] = input_ids, position_ids, attention_mask.bool()
        query = torch.arange(width, device=device)[:, None]
        key = torch.arange(self.cache_len, device=device)[None, :]
        # A query sees the real tokens up to itself, and always itself: a padding position that
        # saw nothing would turn into NaN, and NaN in the cache poisons masked reads too.
        allowed = (valid[:, None, None, :] & (key <= query)) | (key == query)
        mask = torch.zeros(allowed.shape, dtype=self.mask.dtype, device=device)
        mask.masked_fill_(~allowed, self.blocked)
        self.cache.reset()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True,
                            **self.prefill_kwargs).logits[:, -1]
        self.mask.fill_(self.blocked)
        self.mask[:, 0, 0, :width].masked_fill_(valid[:, :width], 0)
        self.positions.copy_(positions[:, -1:])
        self.length, self.rows, self.live = width, n, None
        return logits[:n]

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at `index` (of those still live) go on generating."""
        self.live = index if self.live is None else self.live[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: feed each live row its new token; logits of the live rows."""
        if self.length >= self.cache_len:
            raise RuntimeError(f"static cache of {self.cache_len} tokens is full")
        if self.live is None:
            self.tokens[:self.rows, 0] = tokens
        else:
            self.tokens[self.live, 0] = tokens
        self.positions += 1
        self.mask[:, 0, 0, self.length] = 0  # the new token's slot
        self.length += 1
        logits = self._replay() if self.capture else self._forward()
        return logits[:self.rows] if self.live is None else logits[self.live]

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.tokens, attention_mask=self.mask,
                          position_ids=self.positions, past_key_values=self.cache,
                          use_cache=True).logits[:, -1]

    def _replay(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # First step: run it eagerly on a side stream (the warm-up a capture needs; it is also
        # this step's real work), then record the same step; recording runs nothing.
        side = _warmup_stream(self.tokens.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads (/stats asks torch for free memory) may call
        # CUDA while this thread records; only this thread must keep to capture-safe calls.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.graph = graph
        return logits


class StaticDecoders:
    """`StaticDecoder`s by shape, made on first use; beyond `max_cache_gb` of KV cache the least
    recently used ones are dropped. `capture` defaults to true on a CUDA device."""

    def __init__(self, lm: LoadedModel, capture: bool | None = None,
                 max_cache_gb: float | None = None) -> None:
        self.model, self.device, self.dtype = lm.model, lm.device, lm.dtype
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if max_cache_gb is None:  # leave most of a GPU to weights and everything else
            max_cache_gb = (0.3 * torch.cuda.get_device_properties(self.device).total_memory
                            / 1e9 if self.device.type == "cuda" else 16.0)
        self.max_cache_bytes = max_cache_gb * 1e9
        self._decoders: OrderedDict[tuple[int, int], StaticDecoder] = OrderedDict()

    def shape_for(self, rows: int, tokens: int) -> tuple[int, int]:
        """(batch, cache length) for `rows` rows needing up to `tokens` cache slots."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        cache_len = max(MIN_CACHE_LEN, _next_power_of_two(tokens + 1))
        if limit:
            cache_len = min(cache_len, max(limit, tokens + 1))
        return _next_power_of_two(rows), cache_len

    def decoder(self, rows: int, tokens: int) -> StaticDecoder:
        shape = self.shape_for(rows, tokens)
        if shape in self._decoders:
            self._decoders.move_to_end(shape)
            return self._decoders[shape]
        made = StaticDecoder(self.model, *shape, self.device, self.dtype, self.capture)
        while self._decoders and self.cache_bytes + made.cache_bytes > self.max_cache_bytes:
            self._decoders.popitem(last=False)
        self._decoders[shape] = made
        return made

    def clear(self) -> None:
        """Drop every cache and graph (after running out of memory)."""
        self._decoders.clear()

    @property
    def cache_bytes(self) -> int:
        return sum(d.cache_bytes for d in self._decoders.values())

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return list(self._decoders)
