"""A Request's hooks through the engine, one request at a time and in a batch: each token reaches
`on_token` as it is made, the detokenizer's pieces add up to the final text, `cancelled` stops a
request at its next step, and min_tokens / ignore_eos hold off the stop token. The same for
each way of generating: alone, batched (eager and over static caches) and continuous."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from labkit.engine import hf_generate, text
from labkit.engine.batched import generate_batch
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.request import InvalidRequest, Request
from labkit.engine.static_decode import StaticDecoders

PROMPT = "Suggest a skincare routine for dry skin"


def run(lm, requests, way):
    if way == "alone":
        return [hf_generate.generate(lm, r) for r in requests]
    if way == "continuous":
        cache = PagedKVCache(lm.config, 64, lm.dtype, lm.device)
        return ContinuousEngine(lm, Llama.from_hf(lm.model), cache).generate(requests)
    static = StaticDecoders(lm, capture=False) if way == "static" else None
    return generate_batch(lm, requests, static=static)


WAYS = ["alone", "batched", "static", "continuous"]


@pytest.mark.parametrize("way", WAYS)
def test_every_token_is_streamed_and_the_pieces_add_up_to_the_text(lm, way):
    streamed: list[list[int]] = [[], []]
    pieces = [text.Detokenizer(lm), text.Detokenizer(lm)]
    texts = ["", ""]
    requests = [Request(PROMPT, 40, temperature=0), Request("What does niacinamide do?", 25,
                                                            temperature=0.8, seed=3)]
    for k, request in enumerate(requests):
        def sink(token_id, k=k):
            streamed[k].append(token_id)
            texts[k] += pieces[k].push(token_id)
        request.on_token = sink
    results = run(lm, requests, way)
    for k, result in enumerate(results):
        assert len(streamed[k]) in (result.tokens_generated, result.tokens_generated + 1)  # EOS
        assert texts[k] == result.generated_text == text.decode(lm, streamed[k])


def test_detokenizer_holds_back_a_split_character(lm):
    ids = lm.tokenizer("Crème hydratante 🌿 ok", add_special_tokens=False).input_ids
    detok = text.Detokenizer(lm)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text.decode(lm, ids)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("way", WAYS)
def test_cancelling_stops_a_request_at_its_next_step(lm, way):
    seen = []
    victim = Request(PROMPT, 60, temperature=0.7, seed=1, ignore_eos=True)

    def cancel_after_five(token_id):
        seen.append(token_id)
        if len(seen) == 5:
            victim.cancelled.set()
    victim.on_token = cancel_after_five
    others = [] if way == "alone" else [Request(PROMPT, 30, temperature=0, ignore_eos=True)]
    results = run(lm, [victim, *others], way)
    assert results[0].finish_reason == "cancelled"
    assert results[0].tokens_generated <= 6 < 60
    if others:  # the rest of the batch goes on without it
        assert results[1].tokens_generated == 30 and results[1].finish_reason == "length"


@pytest.mark.parametrize("way", WAYS)
def test_ignore_eos_and_min_tokens_hold_off_the_stop_token(lm, way):
    alone = hf_generate.generate(lm, Request(PROMPT, 200, temperature=0))
    assert alone.finish_reason == "stop"  # the trained model ends its answer with EOS
    n = alone.tokens_generated
    [fixed] = run(lm, [Request(PROMPT, n + 20, temperature=0, ignore_eos=True)], way)
    assert fixed.tokens_generated == n + 20 and fixed.finish_reason == "length"
    [longer] = run(lm, [Request(PROMPT, n + 20, temperature=0, min_tokens=n + 5)], way)
    assert n + 5 <= longer.tokens_generated <= n + 20


def test_min_tokens_is_checked_when_the_request_is_made():
    with pytest.raises(InvalidRequest, match="min_tokens"):
        Request(PROMPT, 10, min_tokens=11)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        Request(PROMPT, 10, min_tokens=-1)
    with pytest.raises(InvalidRequest, match="ignore_eos"):
        Request(PROMPT, 10, ignore_eos="yes")


def test_a_templated_prompt_is_tokenized_as_is(lm):
    messages = [{"role": "user", "content": "Suggest a skincare routine"}]
    prompt = text.chat_prompt(lm, messages)
    assert prompt == text.format_prompt(lm, "Suggest a skincare routine")
    chat = Request(prompt, 5, templated=True)
    plain = Request("Suggest a skincare routine", 5)
    assert text.tokenize(lm, chat) == text.tokenize(lm, plain)


@pytest.mark.parametrize("way", WAYS)
def test_a_result_carries_the_token_ids_its_text_is_decoded_from(lm, way):
    result, = run(lm, [Request(PROMPT, 12, temperature=0.0)], way)
    assert len(result.token_ids) >= result.tokens_generated == 12
    assert text.decode(lm, result.token_ids) == result.generated_text
    assert "token_ids" not in result.as_dict()  # the seed's response fields only


def test_an_engine_that_leaves_text_to_its_caller_sends_the_same_ids(lm):
    """The engine process's way: ids only, the server decodes them."""
    cache = PagedKVCache(lm.config, 64, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model), cache)
    requests = [Request(PROMPT, 12, temperature=0.0), Request("Hello", 7, temperature=0.0)]
    texts = engine.generate(requests)
    engine.detokenize = False
    ids_only = engine.generate([Request(r.prompt, r.max_tokens, 0.0) for r in requests])
    assert [r.generated_text for r in ids_only] == ["", ""]
    assert [r.token_ids for r in ids_only] == [r.token_ids for r in texts]


def test_every_thread_tokenizes_with_a_tokenizer_of_its_own(lm):
    """Short prompts are tokenized on the server's event loop, long ones on its check thread:
    a fast tokenizer used by two threads at once raises "Already borrowed"."""
    side = text.TextSide(lm)
    prompts = [f"{PROMPT} {i} " * (1 + i % 50) for i in range(200)]
    expected = [text.tokenize(lm, Request(p, 5)) for p in prompts]
    start = threading.Barrier(4)

    def tokenize_all(_):
        start.wait()
        requests = [Request(p, 5) for p in prompts]
        for request in requests:
            side.tokenize(request)
        return [r.prompt_ids for r in requests], id(side._own_lm().tokenizer)

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(tokenize_all, range(4)))
    assert all(ids == expected for ids, _ in outcomes)
    tokenizers = {tokenizer for _, tokenizer in outcomes}
    assert len(tokenizers) == 4 and id(lm.tokenizer) not in tokenizers
