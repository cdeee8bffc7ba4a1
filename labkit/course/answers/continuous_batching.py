"""Exercise set 08 (continuous batching): KV pages, requests that fit, the rate where TTFT
gives way."""

from __future__ import annotations

import dataclasses
import math

from labkit.course.answers.verdict import (
    CHOICE_CLOSE,
    CheckResult,
    _choice,
    _config,
    _count,
    _dtype_bytes,
    _finish,
    _float_or_none,
    _how_far,
    _number,
    _percent,
    _positive,
    _result,
    _rows,
    _whole,
)


def _pages_per_request(prompt_tokens: int, output_tokens: int, page_tokens: int) -> int:
    tokens = _count("prompt_tokens", prompt_tokens) + _count("output_tokens", output_tokens)
    return math.ceil(tokens / _count("page_tokens", page_tokens))


def kv_pages_needed(answer, requests: int, prompt_tokens: int, output_tokens: int,
                    page_tokens: int = 16) -> CheckResult:
    """KV cache pages `requests` requests of `prompt_tokens` + `output_tokens` tokens hold at
    once, at `page_tokens` tokens per page: each request rounds up to whole pages of its own.
    A whole number: ✅ only when exact, 🟡 when only the rounding is off."""
    n = _count("requests", requests)
    per_request = _pages_per_request(prompt_tokens, output_tokens, page_tokens)
    tokens = prompt_tokens + output_tokens
    rounding = [
        (n * (tokens // page_tokens), "rounded down; round up, as a request with a few tokens "
                                      "left over still takes a whole page for them"),
        (math.ceil(n * tokens / page_tokens), "that rounds the tokens of all requests "
         "together; each request has pages of its own, so round up per request, then multiply"),
        (n * tokens / page_tokens, "pages come whole; round up the pages of each request, then "
                                   "multiply"),
    ]
    mistakes = [(n * math.ceil(output_tokens / page_tokens), "The prompt's tokens are in the "
                 "cache too: count prompt + output tokens.")]
    return _finish(_whole("kv_pages_needed", answer, n * per_request, noun="pages", rounds=None,
                          rounding=rounding, mistakes=mistakes,
                          hint="pages per request = ceil((prompt + output tokens) ÷ tokens per "
                               "page); then × the number of requests."))


def kv_pages_in_memory(answer, cache_gb: float, shape: str, dtype="bfloat16",
                       page_tokens: int = 16) -> CheckResult:
    """Whole KV cache pages of `page_tokens` tokens that `cache_gb` GB (10^9 bytes) hold for the
    model `shape` in `dtype`: a page is page_tokens × `labkit.engine.kv_cache.bytes_per_token`
    (what `labkit serve --mode continuous --kv-cache-gb` sizes its cache with). A whole number:
    ✅ only when exact, 🟡 when only the rounding is off."""
    import torch

    from labkit.engine.kv_cache import bytes_per_token
    from labkit.engine.model import resolve_dtype

    config = _config(shape)
    memory = _positive("cache_gb", cache_gb) * 1e9
    tokens = _count("page_tokens", page_tokens)
    _dtype_bytes(dtype)  # validates dtype with a clear message
    page_bytes = tokens * bytes_per_token(config, resolve_dtype(dtype, torch.device("cpu")))
    expected = int(memory // page_bytes)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rounding = [(expected + 1, "one too many; round down, as a page that does not fully fit "
                               "is not there")]
    mistakes = [
        (int(2 * memory // page_bytes), "Count both K and V: every token stores a key and a "
                                        "value in each layer."),
        (int(config.num_hidden_layers * memory // page_bytes), "Every layer keeps its own K and "
                                                               "V: multiply by the layers."),
        (int(kv_heads * memory // (heads * page_bytes)), "Grouped-query attention: the cache "
         f"holds num_key_value_heads ({kv_heads}) heads, not num_attention_heads ({heads})."),
        (int(tokens * memory // page_bytes), f"That counts tokens: a page holds {tokens} of "
                                             "them."),
        (int(2**30 * memory / 1e9 // page_bytes), "That reads GB as GiB: 1 GB = 10^9 bytes."),
    ]
    return _finish(_whole("kv_pages_in_memory", answer, expected, noun="pages", rounds="down",
                          rounding=rounding, mistakes=mistakes,
                          hint="bytes per token = 2 (K and V) × layers × kv_heads × head_dim × "
                               "bytes per element; a page is that × tokens per page; the cache's "
                               "bytes ÷ a page's, rounded down."))


def requests_that_fit(answer, kv_pages_total: int, prompt_tokens: int, output_tokens: int,
                      page_tokens: int = 16) -> CheckResult:
    """How many requests of `prompt_tokens` + `output_tokens` tokens a cache of `kv_pages_total`
    pages holds at once, each in whole pages of its own (after that, a request waits, or one
    running is preempted). A whole number: ✅ only when exact, 🟡 when only the rounding is
    off."""
    total = _count("kv_pages_total", kv_pages_total)
    per_request = _pages_per_request(prompt_tokens, output_tokens, page_tokens)
    tokens = prompt_tokens + output_tokens
    per_page = "a request's last page is whole even when it is partly empty, so round the " \
               "pages of one request up, then divide, then round down"
    rounding = [
        (math.ceil(total / per_request), "one too many; round down, as a request that does "
                                         "not fully fit cannot run"),
        (total * page_tokens // tokens, f"that divides by a request's tokens, not its pages; "
                                        f"{per_page}"),
        (total * page_tokens / tokens, f"that divides by a request's tokens, not its pages; "
                                       f"{per_page}"),
    ]
    return _finish(_whole("requests_that_fit", answer, total // per_request, noun="requests",
                          rounds="down", rounding=rounding,
                          hint="pages of one request = ceil((prompt + output) ÷ tokens per page); "
                               "total pages ÷ that, rounded down."))


def rate_where_ttft_passes(answer, rows, target_ms: float, *, rate_key: str = "rate",
                           ttft_key: str = "ttft_p95_ms",
                           served_key: str = "requests_per_second") -> CheckResult:
    """The lowest measured arrival rate whose p95 TTFT is over `target_ms`. `rows`: a list of
    mappings (or a DataFrame) with the rate and its measured p95 TTFT (and, if measured, the
    served rate under `served_key`). A choice among the measured rates: ✅ only for that one,
    exactly; 🟡 for a number within CHOICE_CLOSE of it that no other measured rate is nearer
    (a rounded reading, or the served rate read instead of the arrival rate)."""
    exercise = "rate_where_ttft_passes"
    target = _positive("target_ms", target_ms)
    table = sorted(_rows(rows, (rate_key, ttft_key)), key=lambda r: r[rate_key])
    over = [r for r in table if r[ttft_key] > target]
    if not over:
        raise ValueError(f"no measured rate has p95 TTFT over {target:g} ms; choose a target "
                         "under the highest measured p95 TTFT, or measure higher rates")
    expected = over[0][rate_key]
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    if value == expected:
        return _finish(_result(
            exercise, "correct", f"correct — at {value:g} req/s p95 TTFT was "
            f"{over[0][ttft_key]:.4g} ms, over the {target:g} ms target.", answer, expected))
    rates = [r[rate_key] for r in table]
    rule = (f"one of the measured rates: ✅ for the right one exactly, 🟡 within "
            f"±{_percent(CHOICE_CLOSE)} of it")
    served = [_float_or_none(r.get(served_key)) for r in table]
    why = (f" That is a served rate ({served_key}); the question asks for the arrival rate, "
           f"the {rate_key!r} column." if any(
               x is not None and math.isclose(value, x, rel_tol=1e-3) for x in served) else "")
    if value not in rates:
        nearest = min(rates, key=lambda r: abs(r - value))
        if nearest == expected and abs(value - expected) <= CHOICE_CLOSE * expected:
            return _finish(_result(
                exercise, "close", f"close — {value:g} req/s is {_how_far(value, expected)}, "
                f"not a measured rate ({rule}).{why} Hint: give the rate exactly as measured, "
                f"from the {rate_key!r} column.", answer, expected))
        wrong = _choice(exercise, value, rates, "rates", rule, answer, expected)
        return _finish(dataclasses.replace(wrong, message=wrong.message + why))
    chosen = next(r for r in table if r[rate_key] == value)
    if chosen[ttft_key] <= target:
        hint = (f"at {value:g} req/s p95 TTFT was {chosen[ttft_key]:.4g} ms, within the target; "
                "the question asks for the first rate that goes over it.")
    else:
        hint = ("that rate is over the target, but a lower measured rate already was: take the "
                "lowest rate whose p95 TTFT is over the target.")
    return _finish(_result(exercise, "wrong", f"not yet — {value:g} req/s ({rule}): {hint}",
                           answer, expected))
