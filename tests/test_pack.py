"""How the runner packs a step for the device: a decode step's rows through numpy
(`ModelRunner._pack_decode`) give the same tensor as the general per-row packing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.runner import Chunk, ModelRunner

hypothesis = pytest.importorskip("hypothesis")  # a dev dependency: absent on the GPU machine
st = hypothesis.strategies


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 63), st.integers(0, 2)),
                           min_size=1, max_size=9), st.integers(0, 3), st.randoms())
def test_a_decode_step_packs_as_any_step_does(rows, padding_rows, rng):
    """Rows of one token (decode steps, and prefill chunks of one token, whose tables may run
    past their position), padding rows and padded page columns: the same tensor both ways."""
    cache = PagedKVCache(LlamaConfig(num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, hidden_size=16), 300,
                         torch.float32, torch.device("cpu"))
    runner = ModelRunner(None, cache)
    chunks = [Chunk([token], position, rng.sample(range(1, 300), position // 16 + 1 + extra))
              for token, position, extra in rows]
    pages = max(len(chunk.pages) for chunk in chunks) + rng.randrange(3)
    shape = (len(chunks) + padding_rows, 1, pages)
    assert torch.equal(runner._pack(chunks, *shape, host=True),
                       torch.from_numpy(runner._pack_lists(chunks, *shape)))
