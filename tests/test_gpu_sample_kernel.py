"""The CUDA sampling kernel (`labkit.engine.sample_kernel`) on a GPU: the same chi-square test as
tests/test_sampling.py over bf16 logits, greedy rows equal to torch.argmax (the first of equal
maxima), seeds repeatable and independent of the batch, a full vocabulary of 512 rows, and
CUDA-graph capture."""

import pytest
import torch
from test_sampling import CHI2_999, DRAWS, PROBS, chi_square, nucleus, seeds

from labkit.engine import sample_kernel
from labkit.engine.sampling import next_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.6, 0.3])
def test_kernel_draws_follow_the_nucleus(dtype, temperature, top_p):
    logits = PROBS.log().to(dtype).float()  # the distribution the kernel sees, after rounding
    rows = logits.cuda().to(dtype).expand(DRAWS, -1).contiguous()
    tokens = sample_kernel.sample(rows, torch.full((DRAWS,), temperature, device="cuda"),
                                  torch.full((DRAWS,), top_p, device="cuda"), seeds(DRAWS).cuda())
    expected = nucleus(logits.exp() / logits.exp().sum(), temperature, top_p)
    statistic, df = chi_square(tokens.cpu(), expected)
    assert df == 0 or statistic < CHI2_999[df], (statistic, df)


def test_greedy_rows_equal_argmax_and_seeds_repeat():
    logits = torch.randn(300, 128256, device="cuda").to(torch.bfloat16)
    logits[7, 10] = logits[7, 99] = 50  # equal maxima: the first wins, as torch.argmax
    greedy = sample_kernel.sample(logits, torch.zeros(300, device="cuda"),
                                  torch.ones(300, device="cuda"), seeds(300).cuda())
    assert torch.equal(greedy, logits.argmax(-1)) and greedy[7] == 10
    temperature, top_p = torch.full((300,), 0.7, device="cuda"), torch.full((300,), 0.9,
                                                                            device="cuda")
    s = seeds(300).cuda()
    first = sample_kernel.sample(logits, temperature, top_p, s)
    assert torch.equal(first, sample_kernel.sample(logits, temperature, top_p, s))
    alone = sample_kernel.sample(logits[42:43], temperature[:1], top_p[:1], s[42:43])
    assert alone[0] == first[42]
    assert next_tokens(logits, temperature, top_p, s).equal(first)  # the path engines take


def test_the_kernel_is_captured_by_a_cuda_graph():
    logits = torch.randn(64, 128256, device="cuda").to(torch.bfloat16)
    t, p = torch.ones(64, device="cuda"), torch.full((64,), 0.9, device="cuda")
    s = seeds(64).cuda()
    want = sample_kernel.sample(logits, t, p, s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_kernel.sample(logits, t, p, s)
    graph.replay()
    assert torch.equal(out, want)
