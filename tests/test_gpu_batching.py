"""GPU checks for batched decoding over CUDA graphs (run on a GPU machine: pytest -m gpu)."""

import gc
import threading

import pytest
import torch

from labkit.engine import hf_generate, text
from labkit.engine.batched import generate_batch
from labkit.engine.model import load_model
from labkit.engine.request import Request
from labkit.engine.static_decode import StaticDecoders
from labkit.measure import gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPTS = ["Suggest a skincare routine", "What does niacinamide do?",
           "Suggest a skincare routine for dry, flaky skin in winter, with a gentle cleanser"]


@pytest.fixture(scope="module")
def lm32():
    """The embedded model on the GPU in float32, where greedy text does not hinge on bf16
    rounding."""
    yield load_model("model", device="cuda", dtype="fp32")
    free_gpu_memory()


def free_gpu_memory():
    """Models, caches and graph pools go before the next module measures GPU memory."""
    gc.collect()
    torch.cuda.empty_cache()


def test_graph_replay_equals_sequential_greedy(lm32):
    requests = [Request(p, m, 0) for p, m in zip(PROMPTS, [60, 7, 33], strict=True)]
    decoders = StaticDecoders(lm32)
    assert decoders.capture
    for _ in range(2):  # the second batch replays the graphs captured by the first
        results = generate_batch(lm32, requests, static=decoders)
        for request, r in zip(requests, results, strict=True):
            alone = hf_generate.generate(lm32, request.prompt, max_tokens=request.max_tokens,
                                         temperature=0)
            assert r.generated_text == alone.generated_text
            assert r.tokens_generated == alone.tokens_generated
    assert decoders.shapes == [(4, 256)]


def test_graph_replay_equals_eager_static_decoding_with_sampling():
    lm = load_model("synthetic:llama-3.2-1b")  # bf16, vocabulary of 128k, 16 layers
    requests = [Request(f"prompt {i} " * (i + 1), 40, 0.9, seed=i) for i in range(5)]
    graphs = generate_batch(lm, requests, static=StaticDecoders(lm))
    eager = generate_batch(lm, requests, static=StaticDecoders(lm, capture=False))
    del lm
    free_gpu_memory()
    assert [r.generated_text for r in graphs] == [r.generated_text for r in eager]
    assert all(r.tokens_generated == 40 for r in graphs)


def test_cleared_decoders_give_their_memory_back():
    lm = load_model("synthetic:llama-3.2-1b")

    def allocated_after_a_round(lm) -> int:
        decoders = StaticDecoders(lm)
        for rows in (1, 8):
            generate_batch(lm, [Request("a b", 20, 0.7, seed=1)] * rows, static=decoders)
        assert decoders.shapes == [(1, 256), (8, 256)]
        decoders.clear()
        del decoders
        free_gpu_memory()
        return torch.cuda.memory_allocated()

    first = allocated_after_a_round(lm)  # may keep the warm-up stream's cuBLAS workspace
    assert allocated_after_a_round(lm) == pytest.approx(first, abs=1e6)  # nothing more
    del lm
    free_gpu_memory()


def test_capture_survives_cuda_calls_from_another_thread(lm32):
    """A server's /stats thread asks torch for memory figures while the generation thread may be
    capturing a graph (a new batch shape); neither may break the other."""
    stop = threading.Event()
    calls = []

    def poll_memory():
        while not stop.is_set():
            calls.append(gpu.memory_gb(0))

    poller = threading.Thread(target=poll_memory)
    poller.start()
    try:
        decoders = StaticDecoders(lm32)
        for rows in (1, 2, 4, 8):
            results = generate_batch(lm32, [Request("Oily skin", 12, 0)] * rows,
                                     static=decoders)
            assert all(r.tokens_generated >= 1 for r in results)
    finally:
        stop.set()
        poller.join()
    assert len(decoders.shapes) == 4 and len(calls) > 10


def test_graph_replay_streams_every_token_and_cancels_at_the_next_step(lm32):
    """Under CUDA graphs too: each token reaches on_token as it is made, the pieces add up to
    the text, and a cancelled row leaves while the rest of the batch goes on."""
    decoders = StaticDecoders(lm32)
    streamed: list[list[int]] = [[], []]
    keep = Request(PROMPTS[0], 40, 0, ignore_eos=True)
    victim = Request(PROMPTS[1], 40, 0, ignore_eos=True)
    keep.on_token = streamed[0].append

    def cancel_after_three(token_id):
        streamed[1].append(token_id)
        if len(streamed[1]) == 3:
            victim.cancelled.set()
    victim.on_token = cancel_after_three
    kept, cancelled = generate_batch(lm32, [keep, victim], static=decoders)
    assert decoders.capture and kept.tokens_generated == 40 == len(streamed[0])
    assert kept.generated_text == text.decode(lm32, streamed[0])
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens_generated <= 4
