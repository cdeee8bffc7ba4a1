"""GPU checks for the continuous-batching engine (run on a GPU machine: pytest -m gpu)."""

import gc

import pytest
import torch

from labkit.engine import hf_generate
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model
from labkit.engine.request import Request
from labkit.engine.runner import Chunk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPTS = ["Suggest a skincare routine", "What does niacinamide do?",
           "Suggest a skincare routine for dry, flaky skin in winter, with a gentle cleanser",
           "Is sunscreen needed on cloudy days?", "Morning routine for oily skin"]


@pytest.fixture(scope="module")
def lm32():
    """The embedded model on the GPU in float32: greedy text does not hinge on bf16 rounding."""
    yield load_model("model", device="cuda", dtype="fp32")
    gc.collect()
    torch.cuda.empty_cache()


def engine_for(lm, cuda_graphs: bool, pages: int = 256, **options) -> ContinuousEngine:
    cache = PagedKVCache(lm.config, pages, lm.dtype, lm.device)
    return ContinuousEngine(lm, Llama.from_hf(lm.model), cache, cuda_graphs=cuda_graphs,
                            **options)


def test_graph_replay_equals_eager_and_sequential_greedy(lm32):
    requests = lambda: [Request(p, m, 0)  # noqa: E731
                        for p, m in zip(PROMPTS, [60, 7, 33, 90, 20], strict=True)]
    graphs = engine_for(lm32, cuda_graphs=True, max_running=4, prefill_chunk=16)
    replayed = graphs.generate(requests())
    assert graphs.runner.graphs, "no CUDA graph was captured"
    assert graphs.runner.prefill_graphs, "no prefill was replayed from a CUDA graph"
    eager = engine_for(lm32, cuda_graphs=False, max_running=4, prefill_chunk=16).generate(
        requests())
    sequential = [hf_generate.generate(lm32, r) for r in requests()]
    assert [r.generated_text for r in replayed] == [r.generated_text for r in eager]
    assert [r.generated_text for r in replayed] == [r.generated_text for r in sequential]


def test_a_wide_prefill_replays_a_graph_with_the_eager_logits(lm32):
    """A wave of returning requests admitted in one step: 40 short prompts, one graph; then
    their first decode step, one graph too."""
    engine = engine_for(lm32, cuda_graphs=True, pages=128)
    runner, allocator = engine.runner, engine.block_manager.allocator
    generator = torch.Generator().manual_seed(0)
    chunks = [Chunk(torch.randint(10, 1000, (3 + i % 10,), generator=generator).tolist(), 0,
                    allocator.allocate(1)) for i in range(40)]
    step = [Chunk([7], len(chunk.tokens), chunk.pages) for chunk in chunks]
    with torch.inference_mode():
        replayed = runner.prefill(chunks).clone()
        assert (64, 16, 8) in runner.prefill_graphs  # 40 rows of up to 12 tokens, padded
        replayed_step = runner.decode(step).clone()
        assert (64, 8) in runner.graphs
        runner.cuda_graphs = False
        eager = runner.prefill(chunks)
        eager_step = runner.decode(step)
    # These graphs end at the hidden state; the logits of the 40 real rows come after them.
    assert replayed.shape == eager.shape == (40, lm32.config.vocab_size)
    assert replayed_step.shape == eager_step.shape == (40, lm32.config.vocab_size)
    assert (replayed - eager).abs().max() <= 1e-4 * eager.abs().max()
    assert (replayed_step - eager_step).abs().max() <= 1e-4 * eager_step.abs().max()


def test_warm_up_graphs_hold_no_autograd_state(lm32):
    """The server captures its graphs outside inference mode, and the weights require grad:
    a graph captured with autograd on would keep every layer's activations alive."""
    engine = engine_for(lm32, cuda_graphs=True)
    assert any(p.requires_grad for p in engine.runner.model.parameters())
    engine.runner.capture_all(16, 8)  # 16 rows: past GRAPH_LOGITS_ROWS, so both kinds
    outputs = [graph.out for table in (engine.runner.graphs, engine.runner.prefill_graphs)
               for graph in table.values()]
    tensors = [t for out in outputs for t in (out if isinstance(out, tuple) else (out,))]
    assert any(isinstance(out, tuple) for out in outputs)  # graphs ending at the hidden state
    assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors)


def test_graph_logits_match_eager_and_the_sdpa_path_in_bf16():
    lm = load_model("synthetic:llama-3.2-1b", device="cuda", dtype="bf16")
    engine = engine_for(lm, cuda_graphs=True, pages=64)
    runner, allocator = engine.runner, engine.block_manager.allocator
    pages = [allocator.allocate(3) for _ in range(3)]
    prompt = [[11 + i, 500, 7000, 42, 9] for i in range(3)]
    with torch.inference_mode():
        runner.prefill([Chunk(p, 0, pg) for p, pg in zip(prompt, pages, strict=True)])
        step = [Chunk([77], 5, pg) for pg in pages]
        replayed = runner.decode(step).float()
        runner.cuda_graphs = False
        eager = runner.decode(step).float()
        runner.model.decode_kernel = False  # gather + SDPA instead of the Triton kernel
        gathered = runner.decode(step).float()
        reference = lm.model(torch.tensor([p + [77] for p in prompt], device="cuda")
                             ).logits[:, -1].float()
    assert (replayed - eager).abs().max() <= 0.02 * eager.abs().max()
    assert (eager - gathered).abs().max() <= 0.05 * eager.abs().max()
    assert (replayed - reference).abs().max() <= 0.05 * reference.abs().max()
    del engine, lm
    gc.collect()
    torch.cuda.empty_cache()


def test_the_prefix_cache_changes_no_greedy_token_on_the_gpu(lm32):
    """A shared system prompt (mid-page and whole-page prefixes) through CUDA graphs: the cached
    pages' KV, attended by a later prefill, gives the tokens that computing it again gives."""
    system = ("You are a skincare assistant. Answer briefly, name the active ingredient, and "
              "say when to see a dermatologist. ")
    prompts = [system + p for p in PROMPTS] + [system[:40], system, PROMPTS[0]]
    requests = lambda: [Request(p, 24, 0) for p in prompts]  # noqa: E731
    off = engine_for(lm32, cuda_graphs=True, max_running=4, prefill_chunk=32,
                     prefix_cache=False).generate(requests())
    cached = engine_for(lm32, cuda_graphs=True, max_running=4, prefill_chunk=32)
    first, again = cached.generate(requests()), cached.generate(requests()[::-1])
    assert cached.stats()["prefix_cache_hits"] > len(prompts) * 16
    assert [r.token_ids for r in first] == [r.token_ids for r in off]
    assert [r.token_ids for r in again] == [r.token_ids for r in off][::-1]
