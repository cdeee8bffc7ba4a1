"""The FP8 KV cache on the GPU (`kv_cache_dtype="fp8"`; run on a GPU machine: pytest -m gpu):
the fused RoPE + cache-write kernel stores what eager torch stores, the paged decode-attention
kernel reads FP8 pages as the gathered SDPA path does, and a model captured in CUDA graphs over
an FP8 cache replays its eager logits, close to the model's own cache's. On the CPU:
tests/test_kv_fp8.py."""


import pytest
import torch
import torch.nn.functional as F
from test_gpu_fused import random
from test_gpu_quant import NEEDS_FP8_GPU, graph_steps

from labkit.engine import fused, paged_attention
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import FP8
from labkit.engine.llama import EagerOps, Llama
from labkit.engine.request import Request

pytestmark = NEEDS_FP8_GPU

E4M3_STEP = 2.0 ** -3  # one e4m3 step, relative: a double rounding may move a value by one


@pytest.mark.parametrize("rows,tokens", [(1, 1), (5, 1), (3, 7)])
def test_rope_write_kv_stores_what_eager_stores_in_fp8(rows, tokens):
    heads, kv_heads, dim, page = 24, 8, 128, 16
    pages = rows * tokens // page + 3
    qkv = random(rows, tokens, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16, scale=20)
    angles = torch.rand(rows, tokens, dim // 2, device="cuda") * 100
    angles = torch.cat([angles, angles], -1)[:, :, None]
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    slots = (torch.randperm((pages - 1) * page, device="cuda")[:rows * tokens] + page
             ).view(rows, tokens)
    got, want = (torch.zeros(2, 2, pages, page, kv_heads, dim, dtype=FP8, device="cuda")
                 for _ in range(2))
    fused.rope_write_kv(qkv, cos, sin, got, 1, slots)
    EagerOps.rope_write_kv(qkv, cos, sin, want, 1, slots)
    torch.testing.assert_close(got.float(), want.float(), rtol=E4M3_STEP, atol=2.0 ** -9)
    assert (got.float() == want.float()).float().mean() > 0.99
    assert not got[0].float().any(), "wrote to another layer"


@pytest.mark.parametrize("lengths", [[1, 17, 64, 200], [129]])
def test_paged_attention_reads_fp8_pages_as_the_gathered_path_does(lengths):
    heads, kv_heads, dim, page = 24, 8, 128, 16
    per_row = -(-max(lengths) // page)
    pages = len(lengths) * per_row + 1
    kv = random(1, 2, pages, page, kv_heads, dim, dtype=torch.bfloat16, scale=3).to(FP8)
    table = (torch.randperm(pages - 1, device="cuda")[:len(lengths) * per_row] + 1
             ).view(len(lengths), per_row).int()
    q = random(len(lengths), heads, dim, dtype=torch.bfloat16)
    length = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    got = paged_attention.decode_attention(q, kv[0, 0], kv[0, 1], table, length)
    for row, n in enumerate(lengths):  # the reference: the pages widened, then SDPA
        k, v = (kv[0, i][table[row].long()].reshape(-1, kv_heads, dim)[:n].bfloat16()
                .transpose(0, 1).repeat_interleave(heads // kv_heads, 0) for i in (0, 1))
        want = F.scaled_dot_product_attention(q[row][:, None], k, v)[:, 0]
        torch.testing.assert_close(got[row], want, atol=2e-2, rtol=2e-2)


def test_a_model_over_an_fp8_cache_replays_its_eager_logits_from_graphs(lm16):
    model = Llama.from_hf(lm16.model)
    replayed = graph_steps(lm16, model, capture=True, kv_dtype=FP8)
    eager = graph_steps(lm16, model, capture=False, kv_dtype=FP8)
    plain = graph_steps(lm16, model, capture=False)
    for name in ("prefill", "decode", "alone"):
        got, want, own = replayed[name], eager[name], plain[name]
        assert (got - want).abs().max() <= 1e-2 * want.abs().max(), name
        assert (got - own).norm() / own.norm() < 0.06, name


def test_an_engine_over_an_fp8_cache_serves_greedy_and_sampled_requests(lm16):
    engine = ContinuousEngine.build(lm16, kv_cache_gb=0.05, kv_cache_dtype="fp8",
                                    quantization="fp8")
    engine.warm_up(1, 4)
    results = engine.generate([Request("Suggest a skincare routine", 40, 0, ignore_eos=True),
                               Request("Suggest a skincare routine", 40, 0.7, seed=3,
                                       ignore_eos=True)])
    assert [r.tokens_generated for r in results] == [40, 40]
    assert engine.stats()["kv_cache_dtype"] == "fp8" and engine.block_manager.used == 0
