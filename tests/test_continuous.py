"""The continuous-batching engine on the CPU, with the embedded model in float32: the compact
Llama gives transformers' logits, greedy output equals sequential decoding whatever the batch,
the paged cache queues a burst it cannot hold and never fails it, preempted requests resume
exactly, and the server's continuous mode reports its cache and steps.

Streaming, cancellation and min_tokens / ignore_eos through the engine are in
tests/test_request_hooks.py (the "continuous" way)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from test_launcher import call, server_stats, wait_until
from test_server import stats, wait_loaded
from transformers import LlamaConfig, LlamaForCausalLM

from labkit import cli
from labkit.engine import hf_generate
from labkit.engine.block_manager import BlockAllocator
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache, bytes_per_token
from labkit.engine.llama import Llama
from labkit.engine.request import PromptTooLong, Request
from labkit.engine.runner import PREFILL_GRAPH_TOKENS, Chunk, ModelRunner, unpack
from labkit.serve import schedulers
from labkit.serve.backend import ContinuousBackend
from labkit.serve.http import create_app
from labkit.serve.launcher import launch

PROMPTS = ["Suggest a skincare routine", "What does niacinamide do?",
           "Suggest a skincare routine for dry, flaky skin in winter, with a gentle cleanser",
           "Oily skin", "How often should I exfoliate?"]
MAX_TOKENS = [40, 6, 25, 12, 33]


def engine(lm, pages: int = 256, page_size: int = 16, **options) -> ContinuousEngine:
    cache = PagedKVCache(lm.config, pages, lm.dtype, lm.device, page_size=page_size)
    return ContinuousEngine(lm, Llama.from_hf(lm.model), cache, **options)


def greedy(prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[Request]:
    return [Request(p, m, 0) for p, m in zip(prompts, max_tokens, strict=True)]


def sequential_texts(lm, requests) -> list[str]:
    return [hf_generate.generate(lm, Request(r.prompt, r.max_tokens, 0)).generated_text
            for r in requests]


def logits_by_chunks(model, config, ids: list[int], cuts: list[int]) -> torch.Tensor:
    """Logits after each chunk of `ids` (split at `cuts`), prefilled into pages of 4 tokens."""
    cache = PagedKVCache(config, len(ids) // 4 + 2, torch.float32, torch.device("cpu"),
                         page_size=4)
    runner = ModelRunner(model, cache)
    pages = BlockAllocator(cache.num_pages).allocate(-(-len(ids) // 4))
    bounds = [0, *cuts, len(ids)]
    with torch.inference_mode():
        return torch.cat([runner.prefill([Chunk(ids[a:b], a, pages)])
                          for a, b in zip(bounds, bounds[1:], strict=False)])


def test_compact_llama_gives_transformers_logits_prefilled_whole_or_in_chunks(lm):
    ids = lm.tokenizer("Suggest a skincare routine for dry skin in winter").input_ids
    with torch.no_grad():
        expected = lm.model(torch.tensor([ids])).logits[0]
    model = Llama.from_hf(lm.model)
    got = logits_by_chunks(model, lm.config, ids, cuts=[3, 4, 9])  # the 4 is a decode step
    for row, end in enumerate([3, 4, 9, len(ids)]):
        torch.testing.assert_close(got[row], expected[end - 1], atol=1e-4, rtol=1e-4)


def test_a_forward_that_stops_at_the_hidden_state_ends_with_the_same_logits(lm):
    """Large CUDA graphs end at the hidden state (their logits are computed after the replay,
    so no graph holds its own): `logits()` must finish exactly what `forward` would have."""
    model = Llama.from_hf(lm.model)
    runner = ModelRunner(model, PagedKVCache(lm.config, 8, lm.dtype, lm.device))
    allocator = BlockAllocator(runner.cache.num_pages)
    pages = [allocator.allocate(2) for _ in range(2)]
    chunks = [Chunk([5, 17, 300, 42], 0, pages[0]), Chunk([9, 11], 0, pages[1])]
    inputs = unpack(runner._pack(chunks, 2, 4, 2), 4)
    with torch.inference_mode():
        whole = model(*inputs, cache=runner.cache)
        x, residual = model(*inputs, cache=runner.cache, logits=False)
        assert x.shape == residual.shape == (2, lm.config.hidden_size)
        torch.testing.assert_close(model.logits(x, residual), whole, atol=0, rtol=0)
        # The real rows only (a graph's padding rows are left out): BLAS may round 1 row apart
        torch.testing.assert_close(model.logits(x[:1], residual[:1]), whole[:1], atol=1e-5,
                                   rtol=1e-5)


def test_compact_llama_follows_llama3_rope_scaling_and_untied_weights():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (150,)).tolist()  # past 64: where the scaling matters
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    got = logits_by_chunks(Llama.from_hf(hf), config, ids, cuts=[100])
    torch.testing.assert_close(got[-1], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_are_transformers_cos_and_sin_at_each_position(dtype):
    """The model looks RoPE's cos and sin up in tables made at load: they must be the values
    transformers computes per step, bit for bit, scaling and rounding included."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=300, max_position_embeddings=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    hf = LlamaForCausalLM(config).to(dtype).eval()
    positions = torch.tensor([[0, 1, 63, 64, 200, 255]])
    cos, sin = Llama.from_hf(hf)._rope_tables(positions)
    want_cos, want_sin = hf.model.rotary_emb(torch.zeros(1, dtype=dtype), positions)
    assert cos.shape == (1, 6, 1, 16) and cos.dtype == dtype
    assert torch.equal(cos[:, :, 0], want_cos) and torch.equal(sin[:, :, 0], want_sin)


def test_warm_up_captures_every_padded_shape_a_step_can_take(lm, monkeypatch):
    """The runner's warm-up list is its own padding rules: decode steps of each power-of-two
    row count and page count, short prefills of each width from 2 tokens within the prefill
    graphs' token budget (recorded here, not captured)."""
    runner = ModelRunner(Llama.from_hf(lm.model), PagedKVCache(lm.config, 8, lm.dtype, lm.device),
                         cuda_graphs=False)
    captured = []
    monkeypatch.setattr(runner, "_graph", lambda *shape: captured.append(shape))
    runner.capture_all(12, 64)
    assert captured == []  # CPU: no graphs
    runner.cuda_graphs = True
    runner.capture_all(12, 64)  # 12 rows pad to 16
    decode = {(rows, pages) for rows, width, pages in captured if width == 1}
    prefill = {shape for shape in captured if shape[1] > 1}
    assert decode == {(rows, pages) for rows in (1, 2, 4, 8, 16) for pages in (8, 16, 32, 64)}
    assert prefill == {(rows, width, 8) for rows in (1, 2, 4, 8, 16)
                       for width in (2, 4, 8, 16, 32, 64)}
    assert len(captured) == len(decode) + len(prefill)
    captured.clear()
    runner.capture_all(256, 8)  # a wide batch: prefills of up to 2,048 tokens in all
    prefill = {shape for shape in captured if shape[1] > 1}
    assert (256, 8, 8) in prefill and (32, 64, 8) in prefill
    assert (256, 16, 8) not in prefill and (64, 64, 8) not in prefill
    assert max(rows * width for rows, width, _ in prefill) == PREFILL_GRAPH_TOKENS


def test_greedy_output_equals_sequential_with_chunked_prefill_and_a_busy_batch(lm):
    eng = engine(lm, max_running=3, prefill_chunk=7)
    results = eng.generate(greedy())
    assert [r.generated_text for r in results] == sequential_texts(lm, greedy())
    assert [r.tokens_generated for r in results] == MAX_TOKENS  # none stops early here
    stats = eng.stats()
    assert stats["tokens_per_step"] > 1.5  # rows really shared decode steps
    assert stats["kv_pages_used"] == 0 and stats["running"] == stats["waiting"] == 0


def test_a_burst_beyond_the_cache_queues_preempts_and_resumes_exactly(lm):
    eng = engine(lm, pages=17, page_size=4)  # 64 tokens for everyone: one or two requests
    requests = greedy()
    seen_waiting = []
    for request in requests:
        eng.add(request, lambda result: None)
    while eng.has_work():
        eng.step()
        seen_waiting.append(eng.stats()["waiting"])
        assert eng.block_manager.used <= eng.block_manager.total
    assert max(seen_waiting) > 0 and eng.stats()["preemptions"] > 0
    results = eng.generate(greedy())
    assert [r.generated_text for r in results] == sequential_texts(lm, requests)
    assert eng.block_manager.used == 0


def check_free_lists(allocator) -> None:
    """Blank and evictable blocks are apart and nobody holds them; the evictable ones are
    exactly the cached blocks nobody holds, and the cache's keys point at their blocks."""
    blank, evictable = set(allocator._free), set(allocator._evictable)
    assert not blank & evictable and len(blank) == len(allocator._free)
    assert all(allocator.blocks[b].ref_count == 0 for b in blank | evictable)
    cached = {b.block_id for b in allocator.blocks if b.block_hash is not None}
    assert evictable == {b for b in cached if allocator.blocks[b].ref_count == 0}
    assert not blank & cached
    assert {allocator.blocks[b].block_hash: b for b in cached} == allocator.cached


def test_under_page_pressure_only_live_requests_hold_pages_and_none_leak(lm):
    """Many short and long requests through a cache that fits two or three: at every step the
    pages in use are exactly those the waiting, prefilling and decoding requests hold, each
    counted once per holder (the same prompts share their cached pages; a request that finished
    or was preempted while another made room must not be handed pages). At the end every page
    is blank or cached-but-free, and nobody holds any."""
    eng = engine(lm, pages=17, page_size=4, max_running=6)  # 64 tokens for everyone
    requests = [Request(PROMPTS[i % 5], [1, 2, 30, 3, 20, 1, 2, 12][i % 8], 0, ignore_eos=True)
                for i in range(24)]
    for request in requests:
        eng.add(request)
    allocator = eng.block_manager.allocator
    while eng.has_work():
        eng.step()
        scheduler = eng.scheduler
        live = [*scheduler.waiting, *scheduler.prefilling, *scheduler.decoding]
        holders = collections.Counter(b for seq in live for b in seq.block_table)
        assert {b.block_id: b.ref_count for b in allocator.blocks if b.ref_count} == holders
        assert eng.block_manager.used == len(holders)
        assert not any(seq.block_table for seq in scheduler.waiting)  # new, or preempted
    stats = eng.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert eng.block_manager.used == 0 and {b.ref_count for b in allocator.blocks} == {0}
    check_free_lists(allocator)
    assert stats["kv_pages_evictable"] == stats["kv_pages_cached"] > 0


def test_a_request_whose_last_token_is_on_the_way_is_given_no_page_for_it(lm):
    """A request's last token is never written to the cache (nothing is generated after it),
    so while it is on its way from the device the request needs no page for it: 7 prompt + 6
    generated tokens on pages of 4 hold 12 tokens, 3 pages, never 4 (a 4th page taken there
    could preempt a request that fits)."""
    eng = engine(lm, pages=17, page_size=4)
    request = Request("Oily skin", 6, 0, ignore_eos=True)
    request.prompt_ids = [11, 500, 700, 42, 9, 300, 17]
    held, make_room = [], eng.scheduler.make_room

    def recorded(flush):  # pages held right after each step's room-making
        make_room(flush)
        held.extend(len(seq.block_table) for seq in eng.scheduler.decoding)

    eng.scheduler.make_room = recorded
    assert eng.generate([request])[0].tokens_generated == 6
    assert max(held) == 3


def test_a_request_that_could_never_fit_the_cache_is_refused_with_413(lm):
    eng = engine(lm, pages=5, page_size=4)  # 16 tokens in all
    with pytest.raises(PromptTooLong, match="more than the whole cache holds"):
        eng.add(Request("Suggest a skincare routine for dry skin", 12, 0))
    eng.add(Request("Oily skin", 4, 0))  # fits: accepted


def ids_request(ids, max_tokens: int) -> Request:
    request = Request("ids", max_tokens, 0, ignore_eos=True)
    request.prompt_ids = list(ids)
    return request


def test_a_request_needs_cache_for_all_but_its_last_token(lm):
    """The last token generated is never fed back, so never stored: 8 prompt + 9 generated
    tokens need 16 tokens of cache, and run in a cache of 16; 8 + 10 do not fit."""
    eng = engine(lm, pages=5, page_size=4)  # 16 tokens
    with pytest.raises(PromptTooLong, match="needs 17 tokens"):
        eng.add(ids_request(range(100, 108), 10))
    [result] = eng.generate([ids_request(range(100, 108), 9)])
    assert result.tokens_generated == 9 and eng.stats()["preemptions"] == 0


def test_token_ids_given_by_the_caller_are_checked_against_the_context_too(lm):
    """Ids set on the request skip tokenizing, not the model's context: past it the step
    would fail (RoPE's tables end there) and take every request in flight with it."""
    eng = engine(lm, pages=256)  # 4,096 tokens of cache, more than the 1,024 of context
    context = lm.context_length
    with pytest.raises(PromptTooLong, match=f"the model's context of {context} tokens"):
        eng.add(ids_request(range(100, 100 + context - 50), 51))
    [result] = eng.generate([ids_request(range(100, 100 + context - 50), 50)])
    assert result.tokens_generated == 50


def test_generate_queues_none_of_its_requests_when_one_is_refused(lm):
    eng = engine(lm, pages=5, page_size=4)  # 16 tokens
    with pytest.raises(PromptTooLong):
        eng.generate([ids_request(range(100, 104), 4), ids_request(range(100, 108), 10)])
    assert not eng.has_work()
    [result] = eng.generate([ids_request(range(100, 104), 3)])
    assert result.tokens_generated == 3 and eng.stats()["decode_tokens"] == 2  # 1 from prefill


def test_room_for_a_running_request_is_made_by_preempting_the_newest_even_mid_prefill(lm):
    """A newcomer admitted into the last free pages, its prompt prefilled over several steps:
    when the older running request needs a page, the newcomer goes back to the queue, not the
    request that has run longest (vLLM preempts the newest too)."""
    eng = engine(lm, pages=7, page_size=4, prefill_chunk=4)  # 24 tokens
    older = ids_request(range(100, 108), 12)
    eng.add(older)
    while not (eng.scheduler.decoding and eng.scheduler.decoding[0].length == 12):
        eng.step()  # 3 pages held, a 4th needed soon
    eng.add(ids_request(range(300, 311), 2))  # the 3 free pages, prefilled 4 tokens a step
    preempted, preempt = [], eng.scheduler._preempt
    eng.scheduler._preempt = lambda seq: (preempted.append(seq.request), preempt(seq))
    while eng.has_work():
        eng.step()
    assert preempted and older not in preempted


def test_seeded_sampling_is_the_same_alone_or_in_company(lm):
    def sampled():
        return Request("Suggest a skincare routine", 30, temperature=0.9, top_p=0.9, seed=7)
    [alone] = engine(lm).generate([sampled()])
    crowd = engine(lm, prefill_chunk=5).generate([*greedy(), sampled()])
    assert crowd[-1].generated_text == alone.generated_text
    assert engine(lm).generate([Request("Suggest a skincare routine", 30, 0.9, seed=8)]
                               )[0].generated_text != alone.generated_text


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_pages(lm):
    eng = engine(lm)
    finished = {}
    victim, other = Request(PROMPTS[0], 60, 0, ignore_eos=True), Request(PROMPTS[1], 30, 0,
                                                                        ignore_eos=True)
    eng.add(victim, lambda r: finished.__setitem__("victim", r))
    eng.add(other, lambda r: finished.__setitem__("other", r))
    for _ in range(5):
        eng.step()
    held = eng.block_manager.used
    victim.cancelled.set()
    eng.step()
    assert finished["victim"].finish_reason == "cancelled"
    assert eng.block_manager.used < held and eng.stats()["running"] == 1
    while eng.has_work():
        eng.step()
    assert finished["other"].tokens_generated == 30 and eng.block_manager.used == 0


@pytest.mark.parametrize("flushed", [False, True])
def test_a_cancelled_decoding_request_runs_no_further_step(lm, flushed):
    """Cancelled while its token is on the way: no new step runs for it (its token in flight
    still arrives and ends it); cancelled with none on the way (`flushed`): out before the
    next step."""
    eng = engine(lm)
    finished = {}
    victim, other = (Request(PROMPTS[i], 60, 0, ignore_eos=True) for i in range(2))
    eng.add(victim, lambda r: finished.__setitem__("victim", r))
    eng.add(other, lambda r: finished.__setitem__("other", r))
    for _ in range(5):
        eng.step()
    if flushed:
        eng._flush()  # every token on the host: none on the way
    generated = len(eng.scheduler.decoding[0].generated)
    victim.cancelled.set()
    eng.step()
    assert eng.last_step_tokens == 1, "a step ran the cancelled request"
    assert finished["victim"].finish_reason == "cancelled"
    assert finished["victim"].tokens_generated == generated + (not flushed)
    while eng.has_work():
        eng.step()
    assert finished["other"].tokens_generated == 60 and eng.block_manager.used == 0


def test_kv_bytes_per_token_follow_the_config(lm):
    c = lm.config
    assert bytes_per_token(c, torch.bfloat16) == 2 * c.num_hidden_layers * \
        c.num_key_value_heads * c.head_dim * 2
    cache = PagedKVCache.sized(c, 0.001, torch.float32, torch.device("cpu"))
    assert cache.num_pages == int(1e6 // (bytes_per_token(c, torch.float32) * 16))


def continuous_app(lm, pages: int = 32):
    cache = PagedKVCache(lm.config, pages, lm.dtype, lm.device)
    backend = ContinuousBackend(lm, ContinuousEngine(lm, Llama.from_hf(lm.model), cache))
    return create_app(lambda: backend, mode="continuous", max_batch_size=8)


async def post(client: TestClient, body: dict):
    response = await client.post("/generate", json=body)
    return response.status, await response.json()


def test_continuous_server_answers_reports_its_cache_and_refuses_what_cannot_fit(lm):
    async def scenario():
        async with TestClient(TestServer(continuous_app(lm))) as client:
            await wait_loaded(client)
            answers = await asyncio.gather(*[
                post(client, {"prompt": p, "max_tokens": m, "temperature": 0})
                for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)])
            # fits the model's context (1024 tokens), not the whole cache (31 pages of 16)
            too_long = await post(client, {"prompt": "skin " * 300, "max_tokens": 300})
            return answers, too_long, await stats(client)

    answers, too_long, server = asyncio.run(scenario())
    assert [status for status, _ in answers] == [200] * len(PROMPTS)
    assert [body["generated_text"] for _, body in answers] == sequential_texts(lm, greedy())
    assert too_long[0] == 413 and "KV cache" in too_long[1]["error"]
    assert server["mode"] == "continuous" and server["requests_served"] == len(PROMPTS)
    assert server["kv_pages_total"] == 31 and server["kv_pages_used"] == 0
    assert {"running", "waiting", "preemptions", "tokens_per_step", "prefix_cache_queries",
            "prefix_cache_hits", "kv_pages_cached"} <= set(server)
    assert server["prefix_cache"] is True and server["prefix_cache_queries"] > 0
    assert server["decode_steps"] > 0  # no batches in continuous mode: its own counters instead
    assert server["batches"] is None and server["mean_batch_size"] is None


@pytest.mark.parametrize("args, words", [
    (["--kv-cache-gb", "2"], "--kv-cache-gb applies only to --mode continuous"),
    (["--mode", "batched", "--prefill-chunk", "64"], "applies only to --mode continuous"),
    (["--mode", "continuous", "--max-wait-ms", "5"], "applies only to --mode batched"),
    (["--mode", "batched", "--no-engine-process"], "--no-engine-process applies only to --mode "
                                                  "continuous"),
    (["--mode", "continuous", "--kv-cache-gb", "0"], "--kv-cache-gb must be a positive"),
    (["--mode", "continuous", "--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
])
def test_serve_rejects_continuous_flags_in_the_wrong_mode_or_range(args, words, capsys):
    assert cli.main(["serve", "--model", "no-such-model", *args]) == 2
    assert words in capsys.readouterr().err


def test_the_server_default_batch_cap_is_the_engine_default():
    from labkit.engine import continuous
    assert schedulers.DEFAULT_MAX_RUNNING == continuous.DEFAULT_MAX_RUNNING


def test_sigterm_lets_the_engine_finish_what_it_accepted_then_exit():
    with launch("model", mode="continuous", max_tokens_limit=256, timeout=120) as srv:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(call, srv.url + "/generate",
                                   {"prompt": p, "max_tokens": 60, "temperature": 0}, 120)
                       for p in PROMPTS[:3]]
            wait_until(lambda: server_stats(srv)["running"] > 0, what="running")
            srv.terminate()
            answers = [future.result(timeout=60) for future in pending]
        assert [status for status, _ in answers] == [200, 200, 200]
        assert srv.stop() == 0
        assert "Shutting down (SIGTERM)" in srv.logs() and "stopping now" not in srv.logs()


def test_warm_up_samples_too_so_no_sampled_request_waits_for_a_compile(lm):
    """The sampling kernel (CUDA) compiles at its first call: the warm-up must make that call,
    or the first request at the seed's temperature 0.7 pays it in its first step."""
    eng = engine(lm)
    seen: list[Request] = []
    generate = eng.generate
    eng.generate = lambda requests: (seen.extend(requests), generate(requests))[1]
    eng.warm_up(runs=1, max_tokens=3)
    assert any(r.temperature == 0 for r in seen)
    assert any(r.temperature > 0 and r.top_p is not None and r.top_p < 1 for r in seen)
    assert eng.stats()["kv_pages_used"] == 0
