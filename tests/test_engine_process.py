"""The continuous engine in its own process (what `labkit serve --mode continuous` runs), on the
CPU with the embedded model: outcomes and streamed tokens come back over the pipe as the same
engine gives them in one process, a cancelled request stops and frees its pages, the busy
clock comes from the engine's side, and a dead engine fails its requests with a clear error
instead of leaving them waiting."""

from __future__ import annotations

import threading
import time

import pytest
from test_continuous import PROMPTS, greedy, sequential_texts

from labkit.engine import text
from labkit.engine.request import EngineGone, PromptTooLong, Request
from labkit.serve.engine_process import EngineProcessBackend

PAGES_GB = 0.0006  # ~30 pages of 16 tokens for the embedded model: tight, so requests queue


class Outcomes:
    """Collects each request's outcome as the reader thread delivers it."""

    def __init__(self):
        self.by_request: dict[int, object] = {}
        self.done = threading.Condition()

    def callback(self, index: int):
        def deliver(outcome):
            with self.done:
                self.by_request[index] = outcome
                self.done.notify_all()
        return deliver

    def wait(self, count: int, timeout: float = 60) -> dict[int, object]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.by_request) >= count, timeout), \
                f"{len(self.by_request)} of {count} outcomes after {timeout} s"
        return self.by_request


@pytest.fixture(scope="module")
def backend():
    backend = EngineProcessBackend.start("model", device="cpu", dtype="fp32", warmup_runs=0,
                                         threads=1, max_batch_size=4,
                                         continuous={"kv_cache_gb": PAGES_GB})
    yield backend
    backend.close()


def test_the_engine_process_answers_as_the_engine_does_and_streams_its_tokens(backend, lm):
    busy: list[tuple[str, float]] = []
    backend.engine.on_busy = lambda at: busy.append(("busy", at))
    backend.engine.on_idle = lambda at: busy.append(("idle", at))
    requests = greedy()
    streamed: list[int] = []
    requests[2].on_token = streamed.append
    outcomes = Outcomes()
    sent_at = time.perf_counter()
    for index, request in enumerate(requests):
        backend.tokenize(request)
        backend.engine.add(request, outcomes.callback(index))
    results = outcomes.wait(len(requests))
    assert [results[i].generated_text for i in range(len(requests))] == \
        sequential_texts(lm, requests)
    assert text.decode(lm, streamed) == results[2].generated_text
    assert backend.engine.stats()["kv_pages_used"] == 0  # sent with the outcomes
    assert backend.engine.stats()["kv_pages_total"] < 40  # so requests had to queue
    wait_for(lambda: busy and busy[-1][0] == "idle")
    assert busy[0][0] == "busy" and sent_at <= busy[0][1] <= busy[-1][1] <= time.perf_counter()


def test_the_engine_says_it_is_idle_as_soon_as_its_last_request_is_answered(backend):
    """The busy clock stops with the last step, not after the engine's wait for new messages
    (0.5 s): otherwise a server with nothing in flight reads as busy (notebook 08's CPU run)."""
    idle: list[float] = []
    backend.engine.on_idle = idle.append
    outcomes = Outcomes()
    request = Request(PROMPTS[0], 4, 0.0, ignore_eos=True)
    backend.tokenize(request)
    backend.engine.add(request, outcomes.callback(0))
    outcomes.wait(1)
    answered = time.perf_counter()
    wait_for(lambda: idle, timeout=5)
    assert idle[0] - answered < 0.1, f"idle {idle[0] - answered:.3f} s after the answer"


def test_a_cancelled_request_stops_at_the_next_step_and_frees_its_pages(backend):
    request = Request(PROMPTS[0], 150, 0.7, seed=1, ignore_eos=True)
    backend.tokenize(request)
    seen: list[int] = []

    def on_token(token: int) -> None:  # the reader thread, as a disconnecting client's would
        seen.append(token)
        if len(seen) == 5:
            request.cancelled.set()

    request.on_token = on_token
    outcomes = Outcomes()
    backend.engine.add(request, outcomes.callback(0))
    result = outcomes.wait(1)[0]
    assert result.finish_reason == "cancelled" and 5 <= result.tokens_generated < 30
    assert backend.engine.stats()["kv_pages_used"] == 0


def test_the_cache_check_happens_before_the_pipe(backend):
    with pytest.raises(PromptTooLong, match="KV cache"):
        backend.tokenize(Request("skin " * 300, 400))


def test_a_source_that_does_not_resolve_fails_before_any_process_starts():
    began = time.perf_counter()
    with pytest.raises(ValueError, match="Unknown model source"):
        EngineProcessBackend.start("no-such-model", device="cpu", continuous={})
    assert time.perf_counter() - began < 2  # no torch import in a child


def test_a_dead_engine_fails_its_requests_and_refuses_new_ones():
    backend = EngineProcessBackend.start("model", device="cpu", dtype="fp32", warmup_runs=0,
                                         threads=1, continuous={})
    try:
        request = Request(PROMPTS[0], 1000, 0.7, seed=2, ignore_eos=True)
        backend.tokenize(request)
        started = threading.Event()
        request.on_token = lambda token: started.set()
        outcomes = Outcomes()
        backend.engine.add(request, outcomes.callback(0))
        assert started.wait(30)
        backend.engine._process.kill()  # as the kernel's OOM killer would
        error = outcomes.wait(1)[0]
        assert isinstance(error, EngineGone) and "Restart the server" in str(error)
        with pytest.raises(EngineGone):
            backend.engine.add(Request("again", 5), lambda outcome: None)
    finally:
        backend.close()


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
