"""labkit.serve.http's HTTP contract, bad input, queueing and faults, with a stub model.

The stub (tests/stub_backend.py) replaces only the model: the app, scheduler, validation and
error handling are the real ones. Each test runs its scenario with asyncio.run and aiohttp's
own TestServer/TestClient (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from stub_backend import StubBackend, held_loader

from labkit.serve.http import create_app
from labkit.serve.schedulers import BusyClock

GENERATE_FIELDS = {
    "generated_text": str, "prompt": str, "tokens_generated": int, "inference_time_ms": float,
    "gpu_name": type(None), "gpu_memory_used_gb": type(None), "queue_time_ms": float,
    "time_to_first_token_ms": float, "total_time_ms": float, "tokens_per_second": float,
    "model": str, "request_id": str, "device": str, "prompt_tokens": int, "finish_reason": str,
    "synthetic": bool,
}
SERVER_COUNTERS = {"mode", "uptime_s", "requests_served", "requests_failed", "queue_depth",
                   "in_flight", "busy_seconds", "busy_fraction", "busy_fraction_recent",
                   "recent_window_s"}
VALID = {"prompt": "Suggest a skincare routine", "max_tokens": 5}


@contextlib.asynccontextmanager
async def serving(backend: StubBackend | None = None, loader=None, wait=True, **options):
    backend = backend or StubBackend()
    app = create_app(loader or (lambda: backend), **options)
    async with TestClient(TestServer(app)) as client:
        if wait:
            await wait_loaded(client)
        yield client


async def wait_loaded(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await (await client.get("/")).json())["model_loaded"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("stub model never loaded")


async def stats(client: TestClient) -> dict:
    return (await (await client.get("/stats")).json())["server"]


async def wait_for(client: TestClient, predicate, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = await stats(client)
        if predicate(server):
            return server
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not reached; last /stats server block: {server}")


def test_all_four_endpoints_follow_the_contract():
    async def scenario():
        async with serving() as client:
            root = await client.get("/")
            assert root.status == 200
            assert await root.json() == {"status": "ok", "model_loaded": True}

            health = await client.get("/health")
            assert health.status == 200
            body = await health.json()
            assert body["status"] == "healthy" and body["model_loaded"] is True
            assert body["device"] == "cpu" and body["gpu_name"] is None

            response = await client.post("/generate", json=VALID)
            assert response.status == 200
            body = await response.json()
            for field, kind in GENERATE_FIELDS.items():
                assert isinstance(body[field], kind), (field, body[field])
            assert body["prompt"] == VALID["prompt"] and body["tokens_generated"] == 5
            assert body["device"] == "cpu" and body["gpu_name"] is None
            assert body["total_time_ms"] >= body["queue_time_ms"] + body["inference_time_ms"] - 1
            assert response.headers["X-Request-ID"] == body["request_id"]

            stats_response = await client.get("/stats")
            assert stats_response.status == 200
            body = await stats_response.json()
            for field in ("gpu_name", "gpu_count", "cuda_version", "pytorch_version", "memory",
                          "device", "model"):
                assert field in body
            assert body["gpu_name"] is None and body["device"] == "cpu"
            assert body["memory"] is None  # no GPU: nothing pretends to be one
            assert body["pytorch_version"] == torch.__version__
            assert SERVER_COUNTERS <= set(body["server"])
            assert body["server"]["mode"] == "sequential"
            assert body["server"]["requests_served"] == 1

    asyncio.run(scenario())


def test_503_while_the_model_loads_then_serves():
    backend = StubBackend()
    slow_loader, release = held_loader(backend)

    async def scenario():
        async with serving(loader=slow_loader, wait=False) as client:
            assert await (await client.get("/")).json() == {"status": "ok",
                                                            "model_loaded": False}
            for response in (await client.get("/health"),
                             await client.post("/generate", json=VALID)):
                assert response.status == 503
                assert await response.json() == {"error": "Model not loaded"}
            loading_stats = await client.get("/stats")
            assert loading_stats.status == 200
            assert (await loading_stats.json())["model"] is None
            release.set()
            await wait_loaded(client)
            assert (await client.post("/generate", json=VALID)).status == 200

    asyncio.run(scenario())


class WarmStub(StubBackend):
    """Records the thread of its warm-up and of each generation; the warm-up takes a moment."""

    def __init__(self):
        super().__init__()
        self.threads: list[tuple[str, str]] = []

    def warm_up(self) -> None:
        time.sleep(0.2)
        self.threads.append(("warm-up", threading.current_thread().name))

    def generate(self, request):
        self.threads.append(("generate", threading.current_thread().name))
        return super().generate(request)


def test_warm_up_runs_on_the_generation_thread_before_the_server_is_ready():
    backend = WarmStub()

    async def scenario():
        async with serving(backend, wait=False) as client:
            assert (await client.post("/generate", json=VALID)).status == 503  # warming up
            await wait_loaded(client)
            assert (await client.post("/generate", json=VALID)).status == 200

    asyncio.run(scenario())
    (first, warm_thread), (then, generate_thread) = backend.threads
    assert (first, then) == ("warm-up", "generate")
    assert warm_thread == generate_thread and warm_thread.startswith("labkit-generate")


BAD_INPUT = [
    # (description, request kwargs, status, words the error must contain)
    ("body not JSON", {"data": b"prompt=hi", "headers": {"Content-Type": "application/json"}},
     400, ["not valid JSON", '"prompt"']),
    ("body not UTF-8", {"data": b'{"prompt": "\xc3\x28"}',
                        "headers": {"Content-Type": "application/json"}}, 400, ["UTF-8"]),
    ("JSON array", {"json": ["Suggest a skincare routine"]}, 400, ["JSON object", "array"]),
    ("JSON string", {"json": "Suggest a skincare routine"}, 400, ["JSON object", "string"]),
    ("missing prompt", {"json": {"max_tokens": 5}}, 400, ["Missing field 'prompt'"]),
    ("empty prompt", {"json": {"prompt": ""}}, 400, ["empty"]),
    ("blank prompt", {"json": {"prompt": "   "}}, 400, ["empty"]),
    ("prompt a number", {"json": {"prompt": 42}}, 400, ["string", "integer"]),
    ("prompt null", {"json": {"prompt": None}}, 400, ["string", "null"]),
    ("max_tokens a string", {"json": {**VALID, "max_tokens": "10"}}, 400, ["max_tokens",
                                                                           "integer"]),
    ("max_tokens a float", {"json": {**VALID, "max_tokens": 1.5}}, 400, ["max_tokens"]),
    ("max_tokens a bool", {"json": {**VALID, "max_tokens": True}}, 400, ["max_tokens"]),
    ("max_tokens 0", {"json": {**VALID, "max_tokens": 0}}, 400, ["max_tokens", "from 1"]),
    ("max_tokens over limit", {"json": {**VALID, "max_tokens": 33}}, 400,
     ["max_tokens", "32", "--max-tokens-limit"]),
    ("temperature a string", {"json": {**VALID, "temperature": "hot"}}, 400, ["temperature"]),
    ("temperature < 0", {"json": {**VALID, "temperature": -0.1}}, 400, ["temperature", "0 to 2"]),
    ("temperature > 2", {"json": {**VALID, "temperature": 2.5}}, 400, ["temperature", "0 to 2"]),
    ("temperature NaN", {"data": b'{"prompt": "hi", "temperature": NaN}',
                         "headers": {"Content-Type": "application/json"}}, 400, ["temperature"]),
    ("top_p 0", {"json": {**VALID, "top_p": 0}}, 400, ["top_p", "(0, 1]"]),
    ("top_p > 1", {"json": {**VALID, "top_p": 1.5}}, 400, ["top_p", "(0, 1]"]),
    ("seed negative", {"json": {**VALID, "seed": -1}}, 400, ["seed"]),
    ("unknown field", {"json": {**VALID, "max_token": 5}}, 400,
     ["Unknown field", "'max_token'", "max_tokens"]),
    ("prompt over the context", {"json": {"prompt": "word " * 600, "max_tokens": 10}}, 413,
     ["context", "Shorten the prompt"]),
    ("body over 1 MiB", {"data": b'{"prompt": "' + b"a" * (1024 * 1024) + b'"}',
                         "headers": {"Content-Type": "application/json"}}, 413, ["1 MiB"]),
    ("form content type", {"data": "prompt=hi"}, 415, ["Content-Type", "application/json"]),
    ("text content type", {"data": '{"prompt": "hi"}', "headers": {"Content-Type": "text/plain"}},
     415, ["Content-Type"]),
]


def test_every_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving():
    backend = StubBackend()

    async def scenario():
        async with serving(backend, max_tokens_limit=32) as client:
            for description, kwargs, status, words in BAD_INPUT:
                response = await client.post("/generate", **kwargs)
                assert response.status == status, (description, await response.text())
                assert response.content_type == "application/json", description
                body = await response.json()
                assert set(body) == {"error"}, description
                for word in words:
                    assert word in body["error"], (description, word, body["error"])
            # routing errors: wrong method, unknown path
            wrong_method = await client.get("/generate")
            assert wrong_method.status == 405 and wrong_method.headers["Allow"] == "POST"
            assert "use POST" in (await wrong_method.json())["error"]
            assert (await client.post("/stats")).status == 405
            unknown = await client.get("/v2/completions")
            assert unknown.status == 404
            assert "POST /generate" in (await unknown.json())["error"]
            # ... and the next valid request is served normally
            response = await client.post("/generate", json=VALID)
            assert response.status == 200 and (await response.json())["tokens_generated"] == 5
            server = await stats(client)
            assert server["requests_rejected"] == len(BAD_INPUT) + 1  # + GET /generate
            assert server["requests_served"] == 1 and server["requests_failed"] == 0
        assert len(backend.calls) == 1  # nothing invalid reached the model

    asyncio.run(scenario())


def test_accepts_the_seed_request_and_defaults():
    backend = StubBackend()

    async def scenario():
        async with serving(backend) as client:
            raw = (b'{"prompt": "Suggest a skincare routine for dry skin", "max_tokens": 10,'
                   b' "temperature": 0.7}')
            response = await client.post("/generate", data=raw, headers={
                "Content-Type": "application/json; charset=utf-8"})
            assert response.status == 200
            await client.post("/generate", json={"prompt": "hi"})
        assert backend.calls[0].temperature == 0.7 and backend.calls[0].max_tokens == 10
        assert backend.calls[1].max_tokens == 150 and backend.calls[1].temperature == 0.7
        assert backend.calls[1].top_p is None and backend.calls[1].seed is None

    asyncio.run(scenario())


def test_one_generation_at_a_time_in_fifo_order_with_queue_time():
    delay = 0.15
    backend = StubBackend(delay_s=delay)

    async def scenario():
        async with serving(backend) as client:
            async def send(i: int | str) -> dict:
                await asyncio.sleep(0.02 * i if isinstance(i, int) else 0)  # fixes the order
                return await (await client.post("/generate", json={
                    "prompt": f"request {i}", "max_tokens": 1})).json()

            await send("warm-up")  # first-request costs (imports, connection) stay out of it
            backend.calls.clear()
            bodies = await asyncio.gather(*(send(i) for i in range(4)))
            return bodies, await stats(client)

    bodies, server = asyncio.run(scenario())
    assert [c.prompt for c in backend.calls] == [f"request {i}" for i in range(4)]
    for i, body in enumerate(bodies):
        # request i waits for the i before it, minus its later arrival (0.02 s per place)
        expected_ms = i * (delay - 0.02) * 1000
        assert body["queue_time_ms"] == pytest.approx(expected_ms, abs=40), (i, body)
    assert server["busy_seconds"] == pytest.approx(5 * delay, rel=0.25)  # with the warm-up
    assert server["requests_served"] == 5 and server["queue_depth"] == 0


def test_stats_and_health_answer_fast_while_generating():
    backend = StubBackend()
    backend.gate = threading.Event()

    async def scenario():
        async with serving(backend) as client:
            tasks = [asyncio.create_task(client.post("/generate", json=VALID)) for _ in range(3)]
            # busy_fraction_recent is rounded to 4 places: the first reading after a start
            # may still say 0.0 on a loaded machine, so wait for the clock to show it.
            await wait_for(client, lambda s: s["in_flight"] == 1
                           and s["queue_depth"] == 2 and s["busy_fraction_recent"] > 0)
            timings = []
            for path in ("/stats", "/health", "/", "/stats"):
                started = time.perf_counter()
                assert (await client.get(path)).status == 200
                timings.append(time.perf_counter() - started)
            backend.gate.set()
            responses = await asyncio.gather(*tasks)
            assert [r.status for r in responses] == [200, 200, 200]
            return timings

    timings = asyncio.run(scenario())
    assert max(timings) < 0.25, timings


def test_client_disconnects_do_not_wedge_the_queue():
    backend = StubBackend()
    backend.gate = threading.Event()

    async def scenario():
        async with serving(backend) as client:
            running = asyncio.create_task(client.post("/generate", json={**VALID,
                                                                         "prompt": "running"}))
            await wait_for(client, lambda s: s["in_flight"] == 1)
            queued = asyncio.create_task(client.post("/generate", json={**VALID,
                                                                        "prompt": "queued"}))
            await wait_for(client, lambda s: s["queue_depth"] == 1)
            # Both clients go away: closing their connections (task cancellation) mid-request.
            running.cancel()
            queued.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
            await wait_for(client, lambda s: s["queue_depth"] == 0
                           and s["requests_cancelled"] == 2)
            backend.gate.set()  # the running generation ends; its result is dropped
            response = await client.post("/generate", json={**VALID, "prompt": "next"})
            assert response.status == 200
            return await stats(client)

    server = asyncio.run(scenario())
    # the queued request was withdrawn before it started: the model never saw it
    assert [c.prompt for c in backend.calls] == ["running", "next"]
    assert server["queue_depth"] == 0 and server["in_flight"] == 0
    # "running" finished after its client left: cancelled, not also served; "next" served
    assert server["requests_served"] == 1 and server["requests_cancelled"] == 2


@pytest.mark.parametrize("error, words", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB "
                            "total capacity)"), "Tried to allocate 2.00 GiB"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 8589934592 bytes."), "can't allocate memory"),
])
def test_out_of_memory_answers_503_frees_the_cache_and_keeps_serving(error, words):
    backend = StubBackend()
    backend.fail_next = [error]

    async def scenario():
        async with serving(backend) as client:
            failed = await client.post("/generate", json=VALID)
            assert failed.status == 503
            message = (await failed.json())["error"]
            assert "Out of memory" in message and words in message
            assert "lower max_tokens" in message and "keeps serving" in message
            assert backend.freed == 1
            ok = await client.post("/generate", json=VALID)
            assert ok.status == 200
            return await stats(client)

    server = asyncio.run(scenario())
    assert server["requests_failed"] == 1 and server["requests_served"] == 1


def test_an_unexpected_error_is_a_500_that_says_bug_and_the_server_survives():
    backend = StubBackend()
    backend.fail_next = [KeyError("boom")]

    async def scenario():
        async with serving(backend) as client:
            failed = await client.post("/generate", json=VALID)
            assert failed.status == 500
            assert "bug" in (await failed.json())["error"]
            assert (await client.post("/generate", json=VALID)).status == 200

    asyncio.run(scenario())


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_clock_total_and_recent_fraction():
    clock = FakeClock()
    busy = BusyClock(window_s=5.0, clock=clock)
    clock.now += 2.0
    busy.start()
    clock.now += 3.0
    busy.stop()  # busy from t=2 to t=5
    clock.now += 5.0  # t=10
    assert busy.busy_seconds() == pytest.approx(3.0)
    assert busy.busy_fraction() == pytest.approx(0.3)
    assert busy.busy_fraction_recent() == pytest.approx(0.0)  # window 5..10 was idle
    busy.start()
    clock.now += 1.0  # t=11, running since t=10
    assert busy.busy_seconds() == pytest.approx(4.0)
    assert busy.busy_fraction_recent() == pytest.approx(1.0 / 5.0)
    busy.stop()
    clock.now += 1.5  # window 7.5..12.5 holds the 1 s interval
    assert busy.busy_fraction_recent() == pytest.approx(1.0 / 5.0)


def test_busy_clock_early_window_uses_the_uptime():
    clock = FakeClock()
    busy = BusyClock(window_s=5.0, clock=clock)
    busy.start()
    clock.now += 1.0
    busy.stop()
    clock.now += 1.0
    assert busy.busy_fraction_recent() == pytest.approx(0.5)  # 1 s of 2 s, not of 5
