"""Timed generation on the embedded model and synthetic shapes."""

import pytest

from labkit.engine import hf_generate
from labkit.engine.request import PromptTooLong

SEED_PROMPTS = ["Suggest a skincare routine", "Suggest a skincare routine for dry skin"]
ON_TOPIC = {"skin", "cleanser", "moisturizer", "moisturiser", "sunscreen", "serum", "spf",
            "routine", "toner", "hydrat", "gentle", "cream"}


def on_topic_words(text: str) -> set[str]:
    lower = text.lower()
    return {w for w in ON_TOPIC if w in lower}


@pytest.mark.parametrize("prompt", SEED_PROMPTS)
@pytest.mark.parametrize("temperature", [0, 0.7])
def test_default_model_answers_seed_prompts_on_topic(lm, prompt, temperature):
    result = hf_generate.generate(lm, prompt, max_tokens=150, temperature=temperature, seed=0)
    words = result.generated_text.split()
    assert len(words) >= 10, result.generated_text
    assert len(on_topic_words(result.generated_text)) >= 2, result.generated_text
    assert 1 <= result.tokens_generated <= 150


def test_result_fields_and_timing_are_consistent(lm):
    r = hf_generate.generate(lm, SEED_PROMPTS[0], max_tokens=40, temperature=0)
    assert r.prompt == SEED_PROMPTS[0] and r.device == "cpu"
    assert r.prompt_tokens > 0
    assert 0 < r.time_to_first_token_ms <= r.inference_time_ms
    assert r.tokens_per_second == pytest.approx(
        r.tokens_generated / (r.inference_time_ms / 1000), rel=0.02)
    assert r.finish_reason in {"stop", "length"}
    if r.finish_reason == "length":
        assert r.tokens_generated == 40


def test_seeded_sampling_is_deterministic(lm):
    a = hf_generate.generate(lm, SEED_PROMPTS[1], max_tokens=60, temperature=0.9, seed=123)
    b = hf_generate.generate(lm, SEED_PROMPTS[1], max_tokens=60, temperature=0.9, seed=123)
    assert a.generated_text == b.generated_text


def test_greedy_is_deterministic_without_seed(lm):
    a = hf_generate.generate(lm, SEED_PROMPTS[0], max_tokens=30, temperature=0)
    b = hf_generate.generate(lm, SEED_PROMPTS[0], max_tokens=30, temperature=0)
    assert a.generated_text == b.generated_text


def test_synthetic_always_generates_exactly_max_tokens(tiny):
    for n in (1, 7, 33):
        r = hf_generate.generate(tiny, "hello", max_tokens=n, temperature=0.7, seed=1)
        assert r.tokens_generated == n and r.finish_reason == "length" and r.synthetic
    assert r.time_per_output_token_ms > 0


@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.2}, "top_p"), ({"top_p": "x"}, "top_p"),
])
def test_out_of_range_arguments_name_the_argument(tiny, kwargs, name):
    with pytest.raises(ValueError, match=name):
        hf_generate.generate(tiny, "hello", **kwargs)


@pytest.mark.parametrize("prompt", ["", "   ", None, 42])
def test_prompt_must_be_non_empty_text(tiny, prompt):
    with pytest.raises(ValueError, match="prompt"):
        hf_generate.generate(tiny, prompt)


def test_prompt_longer_than_context_is_refused(lm):
    with pytest.raises(PromptTooLong, match="context"):
        hf_generate.generate(lm, "dry skin " * 2000, max_tokens=10)


def test_warmup_generates_as_many_tokens_as_will_be_timed(tiny, monkeypatch):
    """warmup(runs=2) runs two real greedy generations of WARMUP_TOKENS tokens each (the KV
    cache must reach the length that will be timed), and returns nothing to measure."""
    seen = []
    real = hf_generate.generate

    def spy(lm, request, **sampling):
        result = real(lm, request, **sampling)
        seen.append((sampling, result.tokens_generated))
        return result

    monkeypatch.setattr(hf_generate, "generate", spy)
    assert hf_generate.warmup(tiny, runs=2) is None
    assert seen == [({"max_tokens": hf_generate.WARMUP_TOKENS, "temperature": 0},
                     hf_generate.WARMUP_TOKENS)] * 2
