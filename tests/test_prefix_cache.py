"""The prefix cache (`labkit.engine.block_manager`): full pages keyed by a chained hash,
shared by reference count, kept after their requests end and evicted least recently used.
Greedy output is the same with and without it, no page leaks or is freed while shared, and a
request that fits the cache always runs, evicting what it must."""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_continuous import check_free_lists, engine

from labkit import cli
from labkit.engine.block_manager import BlockManager
from labkit.engine.request import Request
from labkit.engine.sequence import Sequence
from labkit.measure.load_client import shared_prefix
from labkit.serve import cli as serve_cli
from labkit.serve.metrics import ServerMetrics

PAGE = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The embedded model's steps are too small to gain from threads, and lose much to them
    on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seq_of(ids: list[int]) -> Sequence:
    return Sequence(Request("x", 1, 0), None, 0.0, list(ids), len(ids), None)


def requests_of(prompts: list[list[int]], max_tokens: int = 10) -> list[Request]:
    requests = []
    for ids in prompts:
        request = Request("ids", max_tokens, 0, ignore_eos=True)
        request.prompt_ids = list(ids)
        requests.append(request)
    return requests


def check_pages(eng, live: list[Sequence]) -> None:
    """Each page is held exactly by the live sequences whose tables list it; the rest are
    blank or evictable, and every page is one of the three."""
    allocator = eng.block_manager.allocator
    holders: dict[int, int] = {}
    for seq in live:
        for block_id in seq.block_table:
            holders[block_id] = holders.get(block_id, 0) + 1
    assert {b.block_id: b.ref_count for b in allocator.blocks[1:] if b.ref_count} == holders
    assert allocator.used == len(holders)
    check_free_lists(allocator)


def live_seqs(eng) -> list[Sequence]:
    s = eng.scheduler
    return [*s.waiting, *s.prefilling, *s.decoding]


def run_checked(eng, requests: list[Request]) -> list:
    results = {}
    for i, request in enumerate(requests):
        eng.add(request, lambda r, i=i: results.__setitem__(i, r))
    while eng.has_work():
        eng.step()
        check_pages(eng, live_seqs(eng))
    check_pages(eng, [])
    assert eng.block_manager.used == 0
    return [results[i] for i in range(len(requests))]


# -- the block manager alone ----------------------------------------------------------------

def test_a_prompt_shares_the_cached_full_pages_of_its_prefix_and_computes_the_rest():
    manager = BlockManager(16, PAGE)
    first = seq_of(list(range(100, 110)))  # 2 full pages + 2 tokens
    manager.allocate(first)
    manager.cache_blocks(first, 10)
    second = seq_of([*range(100, 108), 7, 7, 7])  # the same 2 full pages, then its own
    assert manager.can_allocate(second)
    manager.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.cached == 8
    assert [manager.allocator.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    manager.free(first)
    assert [manager.allocator.blocks[b].ref_count for b in second.block_table] == [1, 1, 1]
    manager.free(second)
    assert manager.used == 0 and manager.allocator.evictable == 2  # kept, ref count 0
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (21, 8)


def test_a_prompt_of_whole_pages_all_cached_still_computes_its_last_page():
    manager = BlockManager(16, PAGE)
    ids = list(range(200, 212))  # exactly 3 pages
    first = seq_of(ids)
    manager.allocate(first)
    manager.cache_blocks(first, 12)
    again = seq_of(ids)
    manager.allocate(again)
    assert again.cached == 8 and again.block_table[:2] == first.block_table[:2]
    assert again.block_table[2] != first.block_table[2]  # its own: the last token is computed
    manager.cache_blocks(again, 12)  # same tokens cached elsewhere: this page stays uncached
    manager.free(again)
    manager.free(first)
    assert len(manager.allocator.cached) == 3 and manager.allocator.evictable == 3


def test_the_same_tokens_after_a_different_prefix_are_not_a_hit():
    manager = BlockManager(16, PAGE)
    first = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    manager.allocate(first)
    manager.cache_blocks(first, 9)
    other = seq_of([9, 9, 9, 9, 5, 6, 7, 8, 9])  # its second page's tokens match, not its chain
    manager.allocate(other)
    assert other.cached == 0


def test_admission_counts_only_new_pages_and_reclaimed_cached_ones():
    manager = BlockManager(5, PAGE)  # 4 usable pages
    holder = seq_of(list(range(12)))
    manager.allocate(holder)
    manager.cache_blocks(holder, 12)
    assert manager.allocator.available == 1
    sharer = seq_of([*range(8), 50, 51])  # 2 shared (held) pages + 1 new: fits in the 1 free
    assert manager.can_allocate(sharer)
    manager.free(holder)  # all 3 evictable now, 4 available
    assert manager.allocator.evictable == 3
    big = seq_of([*range(8), *range(60, 68)])  # 2 reclaimed + 2 new = 4
    assert manager.can_allocate(big)
    assert not manager.can_allocate(seq_of([*range(8), *range(60, 70)]))  # 2 + 3 = 5 > 4


def test_eviction_takes_blank_pages_first_then_the_least_recently_used():
    manager = BlockManager(5, PAGE)
    old, new = seq_of([1] * 5), seq_of([2] * 5)
    for seq in (old, new):
        manager.allocate(seq)
        manager.cache_blocks(seq, 4)
    old_page, new_page = old.block_table[0], new.block_table[0]
    manager.free(old)
    manager.free(new)  # blank: the two tails; evictable: old's page, then new's
    blank = manager.allocator.allocate(2)
    assert manager.allocator.evictable == 2
    taken = manager.allocator.allocate(1)
    assert taken == [old_page] and new_page in manager.allocator.cached.values()
    assert manager.allocator.blocks[old_page].block_hash is None
    manager.allocator.free(blank + taken)
    again = seq_of([2] * 5)
    manager.allocate(again)
    assert again.block_table[0] == new_page and again.cached == 4


# -- the engine --------------------------------------------------------------------------

def shared_prompts(vocab: int) -> list[list[int]]:
    """Prompts over a common 22-token stem (pages of 4): sharing 10 tokens (mid-page), 12
    (exactly 3 pages), the whole stem, one that is the stem exactly (5.5 pages), one of whole
    pages all cached once its twin ran, and one sharing nothing."""
    rng = random.Random(3)
    stem = [rng.randrange(100, vocab) for _ in range(22)]
    own = [[rng.randrange(100, vocab) for _ in range(n)] for n in (5, 7, 3, 9)]
    return [stem + own[0], stem[:10] + own[1], stem[:12] + own[2], stem,
            stem[:20], stem[:20], stem[:16] + own[3], own[3] + stem[:6]]


def test_greedy_output_is_the_same_with_and_without_the_prefix_cache(lm):
    prompts = shared_prompts(lm.config.vocab_size)
    off = engine(lm, page_size=PAGE, prefill_chunk=16, prefix_cache=False)
    on = engine(lm, page_size=PAGE, prefill_chunk=16)
    expected = [r.token_ids for r in off.generate(requests_of(prompts))]
    first = run_checked(on, requests_of(prompts))
    hits = on.stats()["prefix_cache_hits"]
    assert hits > 0 and off.stats()["prefix_cache_hits"] == 0
    second = run_checked(on, requests_of(prompts[::-1]))  # everything cached by now
    assert [r.token_ids for r in first] == expected
    assert [r.token_ids for r in second] == expected[::-1]
    stats = on.stats()
    assert stats["prefix_cache_queries"] == 2 * sum(map(len, prompts))
    assert stats["prefix_cache_hits"] - hits == sum((len(p) - 1) // PAGE * PAGE for p in prompts)
    assert stats["kv_pages_cached"] == stats["kv_pages_evictable"] > 0
    assert {b.ref_count for b in on.block_manager.allocator.blocks} == {0}


def test_a_cold_burst_of_one_prefix_computes_it_once(lm):
    """Six requests at once over a 40-token stem: the first computes it, the others wait a
    step and find it cached (admitted together, each would compute it again)."""
    rng = random.Random(5)
    stem = [rng.randrange(100, lm.config.vocab_size) for _ in range(40)]
    prompts = [stem + [rng.randrange(100, lm.config.vocab_size) for _ in range(4)]
               for _ in range(6)]
    eng = engine(lm, page_size=PAGE)
    run_checked(eng, requests_of(prompts, 2))
    stats = eng.stats()
    assert stats["prefill_tokens"] == 44 + 5 * 4
    assert stats["prefix_cache_hits"] == 5 * 40


def test_a_failed_step_leaves_no_block_held_or_cached_and_the_engine_serves_on(lm):
    """After a step raises, `reset` drops every request and the whole prefix cache (a block
    written by the failed step must not be found again); the same requests then run as on a
    fresh engine."""
    prompts = shared_prompts(lm.config.vocab_size)[:6]
    expected = [r.token_ids for r in engine(lm, page_size=PAGE, prefix_cache=False)
                .generate(requests_of(prompts))]
    eng = engine(lm, pages=40, page_size=PAGE, max_running=3, prefill_chunk=8)
    for request in requests_of(prompts):
        eng.add(request)
    decode, calls = eng.runner.decode, []

    def fails_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("a failed step")
        return decode(*args, **kwargs)

    eng.runner.decode = fails_on_the_fifth
    with pytest.raises(RuntimeError, match="a failed step"):
        while eng.has_work():
            eng.step()
    assert eng.stats()["kv_pages_cached"] > 0  # something was cached before it failed
    eng.reset()
    allocator = eng.block_manager.allocator
    assert allocator.used == 0 and not allocator.cached and allocator.evictable == 0
    assert {b.ref_count for b in allocator.blocks} == {0}
    assert [r.token_ids for r in run_checked(eng, requests_of(prompts))] == expected


def test_preemption_with_shared_pages_resumes_exactly_and_frees_nothing_shared(lm):
    prompts = [p for p in shared_prompts(lm.config.vocab_size) for _ in range(2)]
    expected = [r.token_ids for r in engine(lm, page_size=PAGE, prefix_cache=False)
                .generate(requests_of(prompts, 16))]
    tiny = engine(lm, pages=17, page_size=PAGE, max_running=6)  # 64 tokens for everyone
    results = run_checked(tiny, requests_of(prompts, 16))
    assert tiny.stats()["preemptions"] > 0 and tiny.stats()["prefix_cache_hits"] > 0
    assert [r.token_ids for r in results] == expected


def test_a_cancelled_request_lets_go_of_shared_pages_only_once(lm):
    prompts = shared_prompts(lm.config.vocab_size)[:2]
    eng = engine(lm, page_size=PAGE)
    eng.generate(requests_of(prompts[:1], 2))  # the stem's pages cached
    victim, other = requests_of(prompts, 30)
    finished = {}
    eng.add(victim, lambda r: finished.__setitem__("victim", r))
    eng.add(other, lambda r: finished.__setitem__("other", r))
    for _ in range(4):
        eng.step()
    shared = set(live_seqs(eng)[0].block_table) & set(live_seqs(eng)[1].block_table)
    assert shared and all(eng.block_manager.allocator.blocks[b].ref_count == 2 for b in shared)
    victim.cancelled.set()
    eng.step()
    assert finished["victim"].finish_reason == "cancelled"
    check_pages(eng, live_seqs(eng))
    assert all(eng.block_manager.allocator.blocks[b].ref_count == 1 for b in shared)
    while eng.has_work():
        eng.step()
    [alone] = engine(lm, page_size=PAGE, prefix_cache=False).generate(requests_of(prompts[1:], 30))
    assert finished["other"].token_ids == alone.token_ids
    check_pages(eng, [])


@pytest.mark.parametrize("max_running", [1, 4])
def test_a_request_that_fits_always_runs_however_full_the_cache_is_of_old_prefixes(
        lm, max_running):
    """A cache of 8 pages of 4 (32 tokens) and many distinct prefixes: pages are evicted for
    new requests, never refused; the last request needs the whole cache."""
    eng = engine(lm, pages=9, page_size=PAGE, max_running=max_running)
    rng = random.Random(max_running)
    prompts = [[rng.randrange(100, lm.config.vocab_size) for _ in range(rng.randrange(5, 20))]
               for _ in range(12)]
    results = run_checked(eng, requests_of(prompts, 8))
    results += run_checked(eng, requests_of([prompts[-1] + [101] * 9], 32 - 9 - len(prompts[-1])))
    assert all(r.finish_reason == "length" for r in results)
    assert [r.tokens_generated for r in results] == [8] * 12 + [32 - 9 - len(prompts[-1])]
    assert eng.stats()["kv_pages_cached"] <= eng.block_manager.total


def test_engine_stats_report_the_prefix_cache(lm):
    stats = engine(lm, prefix_cache=False).stats()
    assert stats["prefix_cache"] is False and stats["prefix_cache_hits"] == 0
    assert {"prefix_cache_queries", "kv_pages_cached", "kv_pages_evictable"} <= set(stats)


def test_metrics_export_the_prefix_cache_under_vllm_names():
    stats = {"queue_depth": 0, "in_flight": 0, "requests_served": 3, "busy_seconds": 1.0,
             "kv_pages_used": 2, "kv_pages_total": 8, "prefix_cache_queries": 120,
             "prefix_cache_hits": 96, "kv_pages_cached": 5}
    text = ServerMetrics(lambda: stats).render().decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert samples["vllm:prefix_cache_queries_total"] == 120
    assert samples["vllm:prefix_cache_hits_total"] == 96
    assert samples["labkit_kv_cache_cached_pages"] == 5


@pytest.mark.parametrize("args, words", [
    (["--no-prefix-cache"], "--no-prefix-cache applies only to --mode continuous"),
    (["--mode", "batched", "--prefix-cache"], "--prefix-cache applies only to --mode continuous"),
])
def test_serve_takes_prefix_cache_flags_in_continuous_mode_only(args, words, capsys):
    assert cli.main(["serve", "--model", "no-such-model", *args]) == 2
    assert words in capsys.readouterr().err


def test_engine_options_carry_the_prefix_cache_choice():
    parser = argparse.ArgumentParser()
    serve_cli.configure_cli(parser)
    for flag, expected in (([], None), (["--no-prefix-cache"], False),
                           (["--prefix-cache"], True)):
        args = parser.parse_args(["--mode", "continuous", *flag])
        assert serve_cli._engine_options(args).get("prefix_cache") is expected


def test_the_shared_prefix_is_deterministic_and_about_as_many_tokens_as_asked(lm):
    assert shared_prefix(300) == shared_prefix(300) != shared_prefix(200)
    for tokens in (50, 1000):
        ids = lm.tokenizer(shared_prefix(tokens), add_special_tokens=False).input_ids
        assert 0.8 * tokens <= len(ids) <= 1.2 * tokens


def test_loadtest_sends_the_shared_prefix_before_each_prompt(tmp_path):
    from labkit.measure import loadtest_cli

    parser = argparse.ArgumentParser()
    loadtest_cli.configure_cli(parser)
    (tmp_path / "prompts.txt").write_text("Oily skin\nDry skin\n")
    args = parser.parse_args(["--shared-prefix", "40", "--prompts-file",
                              str(tmp_path / "prompts.txt")])
    assert loadtest_cli._read_prompts(args) == [f"{shared_prefix(40)}\n\nOily skin",
                                                f"{shared_prefix(40)}\n\nDry skin"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--shared-prefix", "0"])


def test_a_shared_prefix_beyond_any_context_is_refused_at_once(capsys):
    """Not built first (100 M tokens took minutes, silently) only to be refused by the server."""
    from labkit.measure import loadtest_cli

    parser = argparse.ArgumentParser(prog="labkit loadtest")
    loadtest_cli.configure_cli(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--shared-prefix", str(loadtest_cli.MAX_SHARED_PREFIX + 1)])
    assert "--shared-prefix: at most 1,000,000 tokens" in capsys.readouterr().err
