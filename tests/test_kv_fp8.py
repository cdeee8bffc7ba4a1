"""The FP8 KV cache (`kv_cache_dtype="fp8"`, `labkit serve --kv-cache-dtype fp8`) on the CPU:
twice the tokens in the same memory, keys and values stored as e4m3 (rounded to nearest,
saturating) and read back in the model's dtype, the embedded model's logits close to its own
cache's, the engine and `labkit serve` refusing what they cannot run. On the GPU (the Triton
write and attention kernels): tests/test_gpu_kv_fp8.py."""

from __future__ import annotations

import pytest
import torch

from labkit import cli
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import FP8, KV_CACHE_DTYPES, PagedKVCache, resolve_kv_dtype, write_kv
from labkit.engine.llama import Llama
from labkit.engine.request import Request
from labkit.engine.runner import Chunk, ModelRunner, unpack
from labkit.serve.cli import KV_CACHE_DTYPES as CLI_KV_CACHE_DTYPES

TEXT = ("User: Suggest a skincare routine for dry skin in winter\nAssistant: Here is a simple "
        "daily routine that suits most skin types. Morning routine: 1. Cleanser: a mild gel "
        "cleanser.")


def test_fp8_holds_twice_the_tokens_in_the_same_memory(lm):
    plain = PagedKVCache.sized(lm.config, 0.01, torch.bfloat16, lm.device)
    fp8 = PagedKVCache.sized(lm.config, 0.01, FP8, lm.device)
    assert fp8.kv.dtype == FP8 and fp8.kv.element_size() == 1
    assert fp8.num_pages in (2 * plain.num_pages, 2 * plain.num_pages + 1)  # pages are whole


def test_written_keys_and_values_are_e4m3_rounded_and_read_back_in_the_models_dtype(lm):
    torch.manual_seed(0)
    cache = PagedKVCache(lm.config, 4, FP8, lm.device)
    kv_heads, dim = cache.kv_heads, cache.head_dim
    k = torch.randn(1, 3, kv_heads, dim) * 30
    k[0, 0, 0, 0] = 1000.0  # beyond e4m3's 448: saturates, no NaN
    v = torch.randn(1, 3, kv_heads, dim)
    slots = torch.tensor([[17, 18, 40]])  # page 1 offsets 1-2, page 2 offset 8
    write_kv(cache.kv, 1, k, v, slots)
    keys, values = cache.read(1, torch.tensor([[1, 2]]), torch.float32)
    assert keys.dtype == values.dtype == torch.float32
    want_k = k.to(FP8).float()
    assert want_k[0, 0, 0, 0] == 448.0
    for column, position in enumerate((1, 2, 24)):  # (rows, kv_heads, keys, dim)
        torch.testing.assert_close(keys[0, :, position], want_k[0, column], rtol=0, atol=0)
        torch.testing.assert_close(values[0, :, position], v.to(FP8).float()[0, column],
                                   rtol=0, atol=0)
    inside = k.abs() <= 448  # e4m3 keeps 3 mantissa bits: within 1/16 of each normal value
    assert ((want_k - k).abs() <= k.abs() / 16 + 2.0 ** -10)[inside].all()
    assert cache.kv[0].float().abs().sum() == 0  # other layers untouched


def prompt_logits(lm, kv_dtype: torch.dtype) -> torch.Tensor:
    """Every position's logits of TEXT, prefilled in two chunks: the second chunk attends over
    the first's keys and values as the cache stored them."""
    model = Llama.from_hf(lm.model)
    ids = lm.tokenizer(TEXT).input_ids
    pages = -(-len(ids) // 16)
    cache = PagedKVCache(lm.config, pages + 1, kv_dtype, lm.device)
    runner, table = ModelRunner(model, cache), list(range(1, pages + 1))
    half = len(ids) // 2
    out = []
    with torch.inference_mode():
        for chunk in (Chunk(ids[:half], 0, table), Chunk(ids[half:], half, table)):
            n = len(chunk.tokens)
            packed = runner._pack([chunk], 1, n, pages)
            out.append(model(*unpack(packed, n)[:4], None, cache)[0])
    return torch.cat(out)


def test_the_embedded_models_logits_stay_close_with_an_fp8_cache(lm):
    want, got = prompt_logits(lm, lm.dtype), prompt_logits(lm, FP8)
    assert (got - want).norm() / want.norm() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert not torch.equal(got, want)  # the cache really held e4m3 values


def test_an_engine_with_an_fp8_cache_generates_and_reports_it(lm):
    engine = ContinuousEngine.build(lm, kv_cache_gb=0.01, kv_cache_dtype="fp8")
    plain = ContinuousEngine.build(lm, kv_cache_gb=0.01)
    assert engine.stats()["kv_cache_dtype"] == "fp8"
    assert plain.stats()["kv_cache_dtype"] == str(lm.dtype).removeprefix("torch.")
    ratio = lm.dtype.itemsize  # float32 on the CPU: four times the pages
    assert abs(engine.cache.num_pages - ratio * plain.cache.num_pages) < ratio
    results = engine.generate([Request("Suggest a skincare routine", 12, 0, ignore_eos=True),
                               Request("Oily skin", 5, 0.7, seed=1, ignore_eos=True)])
    assert [r.tokens_generated for r in results] == [12, 5]
    assert engine.block_manager.used == 0


def test_unknown_cache_dtypes_and_gpus_without_fp8_are_refused(lm, monkeypatch, capsys):
    assert CLI_KV_CACHE_DTYPES == KV_CACHE_DTYPES
    assert resolve_kv_dtype("auto", torch.bfloat16) == resolve_kv_dtype(None, torch.bfloat16) \
        == torch.bfloat16
    with pytest.raises(ValueError, match="'int8' is not supported; use one of auto, fp8"):
        ContinuousEngine.build(lm, kv_cache_gb=0.01, kv_cache_dtype="int8")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--mode", "continuous", "--kv-cache-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "no-such-model", "--kv-cache-dtype", "fp8"]) == 2
    assert "--kv-cache-dtype applies only to --mode continuous" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert cli.main(["serve", "--model", "no-such-model", "--mode", "continuous",
                     "--kv-cache-dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype fp8 needs FP8 tensor cores" in err and "is 8.0" in err
    assert "Supported on this GPU: --kv-cache-dtype auto" in err
