"""`labkit serve --mode batched`: requests that wait for the model are generated together.

Two halves: the real server on the default model (subprocesses, as a learner runs it: greedy
output equal to sequential serving, per-request timing, mixed lengths, /stats, several servers
started and stopped together), and the scheduler's batching, faults and disconnects with a stub
model in-process (deterministic timing, like tests/test_server.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from stub_backend import StubBackend
from test_launcher import alive, call, server_stats, wait_until
from test_server import stats
from test_server import wait_for as until

from labkit import cli
from labkit.engine.batched import generate_batch
from labkit.engine.model import load_model
from labkit.engine.request import Request, Result
from labkit.serve.http import create_app
from labkit.serve.launcher import ServerProcess, launch_many

PROMPTS = [
    "Suggest a skincare routine",
    "Suggest a skincare routine for dry, flaky skin in winter, with a gentle cleanser",
    "What does niacinamide do?",
    "Oily skin",
    "How often should I exfoliate?",
    "Evening routine for acne-prone skin",
]
MAX_TOKENS = [40, 6, 25, 12, 33, 18]
BATCH_SIZE = 8
WAIT_MS = 300  # long enough that requests sent together on a busy 2-core machine share a batch


# --- the real server, default model ------------------------------------------------------

@pytest.fixture(scope="module")
def servers():
    """A sequential and a batched server on the default model, loading in parallel."""
    sequential = ServerProcess("model", max_tokens_limit=256)
    batched = ServerProcess("model", max_tokens_limit=256, mode="batched", extra_args=[
        "--max-batch-size", str(BATCH_SIZE), "--max-wait-ms", str(WAIT_MS)])
    try:
        for srv in (sequential, batched):
            srv.start()
        for srv in (sequential, batched):
            srv.wait_ready(120)
        yield {"sequential": sequential, "batched": batched}
    finally:
        codes = [srv.stop() for srv in (sequential, batched)]
    assert codes == [0, 0], batched.logs(tail=20)


def send_together(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: call(url + "/generate", body, timeout=120), bodies))


@pytest.fixture(scope="module")
def batch_run(servers):
    """The six prompts, greedy and with mixed max_tokens, sent at once to the batched server."""
    srv = servers["batched"]
    before = server_stats(srv)
    bodies = [{"prompt": p, "max_tokens": m, "temperature": 0}
              for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)]
    answers = send_together(srv.url, bodies)
    assert [status for status, _ in answers] == [200] * len(PROMPTS), answers
    return [body for _, body in answers], before, server_stats(srv)


def test_batched_greedy_output_equals_sequential_per_prompt(servers, batch_run):
    batched, _, _ = batch_run
    for prompt, max_tokens, got in zip(PROMPTS, MAX_TOKENS, batched, strict=True):
        status, alone = call(servers["sequential"].url + "/generate",
                             {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert status == 200
        for field in ("generated_text", "tokens_generated", "finish_reason", "prompt_tokens"):
            assert got[field] == alone[field], (prompt, field)
        assert set(got) == set(alone)  # the same response fields in both modes


def test_concurrent_requests_really_were_batched(batch_run):
    _, before, after = batch_run
    assert after["mode"] == "batched"
    assert after["max_batch_size"] == BATCH_SIZE and after["max_wait_ms"] == WAIT_MS
    batches = after["batches"] - before["batches"]
    served = after["requests_served"] - before["requests_served"]
    assert served == len(PROMPTS) and batches < served  # at least one batch of several
    assert after["mean_batch_size"] > 1
    assert after["queue_depth"] == 0 and after["in_flight"] == 0
    assert after["cuda_graphs"] is False  # CPU: batched decoding runs eagerly


def test_each_request_gets_its_own_tokens_and_consistent_timing(batch_run):
    bodies, _, _ = batch_run
    for body, max_tokens in zip(bodies, MAX_TOKENS, strict=True):
        if body["finish_reason"] == "length":
            assert body["tokens_generated"] == max_tokens
        else:
            assert 1 <= body["tokens_generated"] < max_tokens
        # queue (submit -> batch start) + inference (batch start -> own last token) is the
        # time in the server less parsing, the prompt check, tokenizing the batch and handing the
        # result to the event loop: 6-10 ms measured on the 2-core VM, where each hand-off between
        # the generation thread and the event loop can wait out Python's 5 ms GIL switch interval.
        # A row billed the whole batch, or a queue time missing the batch wait, is off by 100+ ms.
        accounted = body["queue_time_ms"] + body["inference_time_ms"]
        assert body["total_time_ms"] >= accounted - 1, body
        assert body["total_time_ms"] - accounted < 40, body
        assert 0 < body["time_to_first_token_ms"] <= body["inference_time_ms"]
    # a row that finished early was answered then, not when the batch's longest row ended
    shortest = min(bodies, key=lambda b: b["tokens_generated"])
    longest = max(bodies, key=lambda b: b["tokens_generated"])
    assert shortest["tokens_generated"] < longest["tokens_generated"]
    assert shortest["inference_time_ms"] < longest["inference_time_ms"]


def test_bad_input_in_batched_mode_gets_a_4xx_and_reaches_no_batch(servers):
    srv = servers["batched"]
    before = server_stats(srv)
    for body, status, words in [
        ({"prompt": ""}, 400, "empty"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
        ({"prompt": "dry skin " * 2000, "max_tokens": 10}, 413, "Shorten the prompt"),
    ]:
        got_status, got = call(srv.url + "/generate", body)
        assert got_status == status and words in got["error"], got
    after = server_stats(srv)
    assert after["requests_rejected"] - before["requests_rejected"] == 4
    assert after["batches"] == before["batches"]


def test_launch_many_batched_servers_serve_drain_and_stop_with_no_orphans():
    with launch_many(2, "model", mode="batched", max_tokens_limit=256, timeout=120,
                     extra_args=["--max-wait-ms", "50"]) as servers:
        assert len({srv.url for srv in servers}) == 2
        pool = concurrent.futures.ThreadPoolExecutor(4)
        # two requests per server still generating when the block ends: they must finish
        pending = [pool.submit(call, srv.url + "/generate",
                               {"prompt": "Suggest a skincare routine", "max_tokens": 60,
                                "temperature": 0}, 120)
                   for srv in servers for _ in range(2)]
        for srv in servers:
            wait_until(lambda srv=srv: server_stats(srv)["in_flight"] > 0, what="in flight")
    assert [future.result(timeout=30)[0] for future in pending] == [200] * 4
    pool.shutdown()
    assert [srv.process.returncode for srv in servers] == [0, 0]
    assert not any(srv.running() or alive(srv.pid) for srv in servers)
    for srv in servers:
        assert "Shutting down (SIGTERM)" in srv.logs() and "stopping now" not in srv.logs()


@pytest.mark.parametrize("args, words", [
    (["--mode", "batched", "--max-batch-size", "0"], "--max-batch-size: "),
    (["--mode", "batched", "--max-wait-ms", "-1"], "--max-wait-ms: "),
    (["--mode", "batched", "--max-wait-ms", "nan"], "--max-wait-ms: "),
    (["--max-batch-size", "4"], "applies only to --mode batched"),
    (["--no-cuda-graphs"], "--no-cuda-graphs applies only to --mode batched"),
    (["--port", "70000"], "--port must be 0 to 65535"),  # was an OverflowError's traceback
    (["--port", "-1"], "--port must be 0 to 65535"),
])
def test_serve_rejects_bad_batching_flags_before_loading(args, words, capsys):
    assert cli.main(["serve", "--model", "no-such-model", *args]) == 2
    assert words in capsys.readouterr().err


def test_generate_batch_reports_each_row_as_it_finishes():
    tiny = load_model("synthetic:tiny", device="cpu")
    finished: list[tuple[int, int]] = []
    results = generate_batch(tiny, [Request("a", 9, 0), Request("b", 2, 0),
                                    Request("c", 5, 0.7, seed=1)],
                             on_finish=lambda i, r: finished.append((i, r.tokens_generated)))
    assert finished == [(1, 2), (2, 5), (0, 9)]  # in the order the rows finished
    assert [r.tokens_generated for r in results] == [9, 2, 5]


# --- the scheduler with a stub model (in-process) ------------------------------------------

class BatchStub(StubBackend):
    """StubBackend plus generate_batch: records each batch's prompts, raises the next injected
    failure at once, else obeys the gate and delay and answers every row at the batch's end."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__(delay_s)
        self.batches: list[list[str]] = []

    def generate_batch(self, requests, on_finish=None) -> list[Result]:
        self.batches.append([r.prompt for r in requests])
        if self.fail_next:  # checked first: a test can arm it while a batch is held
            raise self.fail_next.pop(0)
        self.started.set()
        started = time.perf_counter()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        elapsed_ms = (time.perf_counter() - started) * 1000
        results = [Result(
            generated_text=" ".join(["word"] * r.max_tokens), prompt=r.prompt,
            tokens_generated=r.max_tokens, prompt_tokens=len(r.prompt.split()),
            time_to_first_token_ms=1.0, inference_time_ms=round(elapsed_ms, 2),
            tokens_per_second=1.0, time_per_output_token_ms=None, device="cpu",
            model=self.name, synthetic=False, finish_reason="length") for r in requests]
        for i, result in enumerate(results):
            if on_finish is not None:
                on_finish(i, result)
        return results


@contextlib.asynccontextmanager
async def batched_app(backend: BatchStub, **options):
    app = create_app(lambda: backend, mode="batched", **options)
    async with TestClient(TestServer(app)) as client:
        deadline = time.monotonic() + 10
        while not (await (await client.get("/")).json())["model_loaded"]:
            assert time.monotonic() < deadline, "stub never loaded"
            await asyncio.sleep(0.01)
        yield client


def generate(client: TestClient, prompt: str, max_tokens: int = 3):
    return asyncio.create_task(client.post("/generate", json={"prompt": prompt,
                                                              "max_tokens": max_tokens}))


def test_batches_are_capped_at_max_batch_size_in_arrival_order():
    backend = BatchStub()
    backend.gate = threading.Event()

    async def scenario():
        async with batched_app(backend, max_batch_size=2, max_wait_ms=50) as client:
            first = generate(client, "p0")
            await until(client, lambda s: s["in_flight"] == 1)  # p0 waited 50 ms, alone
            rest = []
            for i in range(1, 6):
                rest.append(generate(client, f"p{i}"))
                await until(client, lambda s, n=i: s["queue_depth"] == n)
            backend.gate.set()
            responses = await asyncio.gather(first, *rest)
            assert [r.status for r in responses] == [200] * 6
            return await stats(client)

    server = asyncio.run(scenario())
    assert backend.batches == [["p0"], ["p1", "p2"], ["p3", "p4"], ["p5"]]
    assert server["batches"] == 4 and server["mean_batch_size"] == 1.5
    assert server["requests_served"] == 6 and server["max_batch_size"] == 2


def test_a_batch_waits_at_most_max_wait_ms_for_company():
    backend = BatchStub()

    async def scenario():
        async with batched_app(backend, max_batch_size=4, max_wait_ms=200) as client:
            started = time.perf_counter()
            alone = await (await client.post("/generate", json={"prompt": "alone"})).json()
            waited = time.perf_counter() - started
            # two requests 50 ms apart, inside one window: one batch
            a = generate(client, "a")
            await asyncio.sleep(0.05)
            b = generate(client, "b")
            bodies = [await r.json() for r in await asyncio.gather(a, b)]
            return alone, waited, bodies

    alone, waited, (a, b) = asyncio.run(scenario())
    assert alone["queue_time_ms"] == pytest.approx(200, abs=60)  # the window, then alone
    assert waited < 1.0
    assert backend.batches == [["alone"], ["a", "b"]]
    assert a["queue_time_ms"] - b["queue_time_ms"] == pytest.approx(50, abs=30)


def test_out_of_memory_in_a_batch_fails_each_request_with_503_and_keeps_serving():
    backend = BatchStub()
    backend.gate = threading.Event()

    async def scenario():
        async with batched_app(backend, max_batch_size=8, max_wait_ms=0) as client:
            blocker = generate(client, "blocker")  # holds the model while three queue up
            await until(client, lambda s: s["in_flight"] == 1)
            queued = [generate(client, f"q{i}") for i in range(3)]
            await until(client, lambda s: s["queue_depth"] == 3)
            backend.fail_next = [torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                        "allocate 4.00 GiB")]
            backend.gate.set()
            responses = await asyncio.gather(blocker, *queued)
            bodies = [await r.json() for r in responses]
            after = await client.post("/generate", json={"prompt": "after"})
            return [r.status for r in responses], bodies, after.status, await stats(client)

    statuses, bodies, after, server = asyncio.run(scenario())
    assert backend.batches == [["blocker"], ["q0", "q1", "q2"], ["after"]]
    assert statuses == [200, 503, 503, 503] and after == 200
    for body in bodies[1:]:
        assert "Out of memory" in body["error"] and "4.00 GiB" in body["error"]
        assert "batch of 3 requests" in body["error"] and "--max-batch-size" in body["error"]
    assert backend.freed == 1
    assert server["requests_failed"] == 3 and server["requests_served"] == 2


def test_disconnects_in_batched_mode_withdraw_queued_requests_and_spare_the_batch():
    backend = BatchStub()
    backend.gate = threading.Event()

    async def scenario():
        async with batched_app(backend, max_batch_size=2, max_wait_ms=300) as client:
            running = [generate(client, "r0"), generate(client, "r1")]  # one batch
            await until(client, lambda s: s["in_flight"] == 2)
            queued = {}
            for n, prompt in enumerate(("kept", "gone", "kept too"), 1):  # in this order
                queued[prompt] = generate(client, prompt)
                await until(client, lambda s, n=n: s["queue_depth"] == n)
            running[0].cancel()  # its client leaves mid-batch: r1 must still be answered
            queued["gone"].cancel()  # leaves before its batch starts: withdrawn, takes no slot
            await asyncio.gather(running[0], queued["gone"], return_exceptions=True)
            await until(client, lambda s: s["queue_depth"] == 2 and s["requests_cancelled"] == 2)
            backend.gate.set()
            answered = await asyncio.gather(running[1], queued["kept"], queued["kept too"])
            assert [r.status for r in answered] == [200, 200, 200]
            return await stats(client)

    server = asyncio.run(scenario())
    assert backend.batches == [["r0", "r1"], ["kept", "kept too"]]
    assert server["queue_depth"] == 0 and server["in_flight"] == 0
    # r0 was generated but its client had left: cancelled, not also served (5 sent in all)
    assert server["requests_served"] == 3 and server["requests_cancelled"] == 2
