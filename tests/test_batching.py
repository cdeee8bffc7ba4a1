"""Batched generation: each row gets what it would get alone, its own length, timing and RNG."""

import pytest
import torch

from labkit.engine import hf_generate, text
from labkit.engine.batched import generate_batch
from labkit.engine.request import InvalidRequest, PromptTooLong, Request
from labkit.engine.sampling import next_tokens
from labkit.engine.static_decode import StaticDecoders

# Different lengths, so the batch is left-padded.
PROMPTS = [
    "Suggest a skincare routine",
    "Suggest a skincare routine for dry, flaky skin in winter, with a gentle cleanser",
    "What does niacinamide do?",
    "Oily skin",
]


@pytest.fixture(params=["dynamic", "static"])
def batch(request):
    """generate_batch over a DynamicCache, or over static caches (the CUDA-graph path, run
    eagerly: the same masks, cache slots and padding rows, without the capture)."""
    def run(lm, requests, **kwargs):
        static = StaticDecoders(lm, capture=False) if request.param == "static" else None
        return generate_batch(lm, requests, static=static, **kwargs)
    return run


def greedy_ids(lm, prompt: str, max_tokens: int) -> list[int]:
    request = Request(prompt, max_tokens, temperature=0)
    ids = torch.tensor([text.tokenize(lm, request)])
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids),
                                pad_token_id=lm.tokenizer.pad_token_id,
                                **hf_generate.sampling_kwargs(lm, request))
    return out[0, ids.shape[1]:].tolist()


def assert_same_as_alone(batched, alone):
    assert batched.generated_text == alone.generated_text
    assert batched.tokens_generated == alone.tokens_generated
    assert batched.finish_reason == alone.finish_reason
    assert batched.prompt_tokens == alone.prompt_tokens


def test_greedy_batch_equals_sequential_with_mixed_lengths(lm, batch):
    max_tokens = [60, 12, 35, 1]
    results = batch(lm, [Request(p, m, temperature=0)
                                  for p, m in zip(PROMPTS, max_tokens, strict=True)])
    assert [r.prompt for r in results] == PROMPTS
    for prompt, m, batched in zip(PROMPTS, max_tokens, results, strict=True):
        alone = hf_generate.generate(lm, prompt, max_tokens=m, temperature=0)
        assert_same_as_alone(batched, alone)
        assert 1 <= batched.tokens_generated <= m


def test_batch_of_one_equals_sequential(lm, batch):
    [batched] = batch(lm, [Request(PROMPTS[1], 40, temperature=0)])
    alone = hf_generate.generate(lm, PROMPTS[1], max_tokens=40, temperature=0)
    assert_same_as_alone(batched, alone)


@pytest.fixture
def stop_on_token(lm):
    """Make a token of one prompt's greedy continuation the model's EOS, so that request stops at
    a known step whatever the trained model does; yields (row, step), restores the EOS after."""
    config = lm.model.generation_config
    saved, config.eos_token_id = config.eos_token_id, None  # continuations with no stop
    try:
        for row, prompt in enumerate(PROMPTS):
            ids = greedy_ids(lm, prompt, 30)
            steps = [k for k in range(3, 30) if ids[k] not in ids[:k]]
            if steps:
                config.eos_token_id = ids[steps[0]]
                yield row, steps[0]
                break
        else:
            pytest.fail("no prompt's greedy continuation has a new token after step 3")
    finally:
        config.eos_token_id = saved


def test_row_that_stops_early_is_billed_its_own_tokens(lm, stop_on_token, batch):
    row, step = stop_on_token
    results = batch(lm, [Request(p, 30, temperature=0) for p in PROMPTS])
    stopped = results[row]
    assert stopped.finish_reason == "stop" and stopped.tokens_generated == step
    for prompt, batched in zip(PROMPTS, results, strict=True):
        alone = hf_generate.generate(lm, prompt, max_tokens=30, temperature=0)
        assert_same_as_alone(batched, alone)
    longest = max(results, key=lambda r: r.tokens_generated)
    assert longest.tokens_generated > stopped.tokens_generated
    assert stopped.inference_time_ms < longest.inference_time_ms


def test_synthetic_rows_generate_exactly_their_max_tokens(tiny, batch):
    requests = [Request("hello", 1, 0), Request("a longer synthetic prompt", 33, 0.8),
                Request("hi", 7, 0, seed=3), Request("x y z", 20, 1.2, 0.9, seed=4)]
    results = batch(tiny, requests)
    for request, r in zip(requests, results, strict=True):
        assert r.tokens_generated == request.max_tokens
        assert r.finish_reason == "length" and r.synthetic and "synthetic" in r.model
    for request in requests[:1] + requests[2:3]:  # the greedy rows
        batched = results[requests.index(request)]
        assert_same_as_alone(batched, hf_generate.generate(tiny, request.prompt,
                                                         max_tokens=request.max_tokens,
                                                         temperature=0))


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(lm, batch):
    # Rows of different lengths drop out of the batch at different steps, so the remaining
    # rows are re-indexed mid-generation: each must keep drawing from its own generator.
    requests = [Request(PROMPTS[0], 40, 1.0, seed=7), Request(PROMPTS[1], 5, 0.8),
                Request(PROMPTS[2], 40, 1.3, 0.95, seed=11), Request(PROMPTS[3], 9, 0),
                Request(PROMPTS[0], 40, 1.0, seed=7)]
    batched = batch(lm, requests)
    for i in (0, 2):
        [alone] = batch(lm, [requests[i]])
        assert batched[i].generated_text == alone.generated_text
    assert batched[4].generated_text == batched[0].generated_text  # same seed, same draws
    [other_seed] = batch(lm, [Request(PROMPTS[0], 40, 1.0, seed=8)])
    assert other_seed.generated_text != batched[0].generated_text


def test_tiny_top_p_is_greedy(lm):
    [nucleus] = generate_batch(lm, [Request(PROMPTS[2], 30, temperature=1.5, top_p=1e-6)])
    alone = hf_generate.generate(lm, PROMPTS[2], max_tokens=30, temperature=0)
    assert_same_as_alone(nucleus, alone)


def test_sampling_follows_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    seeds = torch.randint(0, 2**31, (4000,), generator=torch.Generator().manual_seed(0))

    def frequencies(temperature: float, top_p: float) -> torch.Tensor:
        tokens = next_tokens(logits, torch.full((4000,), temperature), torch.full((4000,), top_p),
                             seeds)
        return (torch.bincount(tokens, minlength=4) / 4000).tolist()

    assert frequencies(1.0, 1.0) == pytest.approx(probs.tolist(), abs=0.03)
    flat = torch.softmax(probs.log() / 2, -1)
    assert frequencies(2.0, 1.0) == pytest.approx(flat.tolist(), abs=0.03)
    # Nucleus 0.7: tokens 0 and 1 (0.5 < 0.7 <= 0.8), renormalised.
    assert frequencies(1.0, 0.7) == pytest.approx([0.625, 0.375, 0, 0], abs=0.03)


def test_timing_is_per_row(tiny):
    requests = [Request("a", 5, 0), Request("b c d", 40, 0), Request("e", 20, 0.7)]
    results = generate_batch(tiny, requests)
    ttfts = {r.time_to_first_token_ms for r in results}
    assert len(ttfts) == 1  # every row's first token comes out of the same prefill
    short, long_, mid = results
    assert 0 < short.time_to_first_token_ms < short.inference_time_ms
    assert short.inference_time_ms < mid.inference_time_ms < long_.inference_time_ms
    for r in results:
        assert r.tokens_per_second == pytest.approx(
            r.tokens_generated / (r.inference_time_ms / 1000), rel=0.02)
        assert r.time_per_output_token_ms == pytest.approx(
            (r.inference_time_ms - r.time_to_first_token_ms) / (r.tokens_generated - 1), abs=0.01)
    [one] = generate_batch(tiny, [Request("a", 1, 0)])
    assert one.tokens_generated == 1 and one.time_per_output_token_ms is None


BAD_ARGUMENTS = [
    {"max_tokens": 0}, {"max_tokens": 1.5}, {"max_tokens": "10"}, {"max_tokens": True},
    {"temperature": -0.1}, {"temperature": 2.5}, {"temperature": "hot"},
    {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.2}, {"top_p": "x"},
    {"prompt": ""}, {"prompt": "   "}, {"prompt": None}, {"prompt": 42},
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_once_when_the_request_is_made(tiny, kwargs):
    """A Request checks its arguments when it is made, and the Python entry makes one: both
    refuse the same value with the same message, naming the field."""
    arguments = {"prompt": "hello", **kwargs}
    [field] = kwargs
    with pytest.raises(InvalidRequest, match=field) as made:
        Request(**arguments)
    with pytest.raises(InvalidRequest) as alone:
        hf_generate.generate(tiny, arguments.pop("prompt"), **arguments)
    assert str(alone.value) == str(made.value)


def test_prompt_too_long_names_the_request(lm):
    requests = [Request("hello", 3), Request("hi", 3),
                Request("dry skin " * 2000, 10)]
    with pytest.raises(PromptTooLong, match=r"^request 2: .*context"):
        generate_batch(lm, requests)


def test_empty_batch_returns_nothing(tiny):
    assert generate_batch(tiny, []) == []


def test_static_and_dynamic_decoding_draw_the_same_samples(lm):
    requests = [Request(p, 25, 1.0, seed=i) for i, p in enumerate(PROMPTS)]
    dynamic = generate_batch(lm, requests)
    static = generate_batch(lm, requests, static=StaticDecoders(lm, capture=False))
    assert [r.generated_text for r in static] == [r.generated_text for r in dynamic]


def test_static_decoders_reuse_padded_shapes(tiny):
    decoders = StaticDecoders(tiny, capture=False)
    first = generate_batch(tiny, [Request("a b", 5, 0)] * 3, static=decoders)
    again = generate_batch(tiny, [Request("a b", 5, 0)] * 4, static=decoders)
    assert decoders.shapes == [(4, 256)]  # 3 and 4 rows, 7 slots: one shape, reset between
    assert [r.generated_text for r in again[:3]] == [r.generated_text for r in first]
    generate_batch(tiny, [Request("a b", 300, 0)] * 5, static=decoders)
    assert decoders.shapes == [(4, 256), (8, 512)]


def test_static_decoders_drop_the_least_recently_used_beyond_their_budget(tiny):
    decoders = StaticDecoders(tiny, capture=False)
    unit = decoders.decoder(1, 10).cache_bytes  # 1 row x 256 slots
    decoders.max_cache_bytes = 4 * unit
    decoders.decoder(2, 10)  # 2 units
    decoders.decoder(1, 10)  # used again: (2, 256) is now the least recently used
    decoders.decoder(1, 300)  # 1 x 512 = 2 units: 5 > 4, so (2, 256) goes
    assert decoders.shapes == [(1, 256), (1, 512)] and decoders.cache_bytes == 3 * unit


def test_cuda_graphs_need_a_cuda_device(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoders(tiny, capture=True)
