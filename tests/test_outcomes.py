"""Every generation request ends in exactly one outcome, and the counters add up: after bursts,
bad input, disconnects (queued, generating and mid-stream), a failure and requests sent while
loading, served + failed + cancelled + rejected = sent, in /stats and in /metrics alike."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from stub_backend import StubBackend, held_loader
from test_continuous import continuous_app
from test_server import serving, stats, wait_for

from labkit.engine.request import OutOfMemory

MESSAGES = [{"role": "user", "content": "hi"}]
OUTCOMES = ("served", "failed", "cancelled", "rejected")


async def outcomes(client) -> tuple[dict, dict]:
    """(from /stats, from /metrics) by outcome."""
    server = await stats(client)
    text = await (await client.get("/metrics")).text()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "labkit_requests")
    metrics = {s.labels["outcome"]: int(s.value) for s in family.samples
               if s.name.endswith("_total")}
    return {o: server[f"requests_{o}"] for o in OUTCOMES}, metrics


async def drop_stream(client, path: str, body: dict) -> None:
    """A client that reads two chunks of a stream, then goes away."""
    response = await client.post(path, json={**body, "stream": True})
    for _ in range(2):
        await response.content.readuntil(b"\n\n")
    response.close()


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_served_failed_cancelled_and_rejected_add_up_to_what_was_sent(mode):
    backend = StubBackend(token_delay_s=0.002)
    load, release = held_loader(backend)

    async def scenario():
        async with serving(backend, loader=load, wait=False, mode=mode) as client:
            sent = 0
            while_loading = [await client.post("/generate", json={"prompt": "hi"})
                             for _ in range(3)]
            assert {r.status for r in while_loading} == {503}
            sent += 3
            release.set()
            await wait_for(client, lambda s: True)
            while not (await (await client.get("/")).json())["model_loaded"]:
                await asyncio.sleep(0.01)

            burst = [client.post("/generate", json={"prompt": f"p{i}", "max_tokens": 4})
                     for i in range(12)]
            burst += [client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
                      for _ in range(6)]
            burst += [client.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 3, "stream": True}) for _ in range(4)]
            bad = [client.post("/generate", data=b"{not json", headers={
                       "Content-Type": "application/json"}),
                   client.post("/generate", json={"prompt": "hi", "max_tokens": 0}),
                   client.post("/v1/completions", json={"prompt": "\ud800"}),
                   client.post("/v1/chat/completions", json={"messages": []}),
                   client.post("/v1/completions", data=b"x", headers={"Content-Type": "x/y"}),
                   client.get("/generate")]
            answers = await asyncio.gather(*burst, *bad)
            sent += len(answers)
            assert [r.status for r in answers[:len(burst)]] == [200] * len(burst)
            assert all(400 <= r.status < 500 for r in answers[len(burst):])

            for path, body in [("/v1/completions", {"prompt": "hi"}),
                               ("/v1/chat/completions", {"messages": MESSAGES})]:
                await drop_stream(client, path, {**body, "max_tokens": 500, "ignore_eos": True})
                sent += 1
            await wait_for(client, lambda s: s["in_flight"] == 0 and s["queue_depth"] == 0)
            backend.gate = threading.Event()  # the next generation holds: one queues behind it
            running = asyncio.create_task(client.post("/generate", json={"prompt": "a"}))
            await wait_for(client, lambda s: s["in_flight"] >= 1 and s["queue_depth"] == 0)
            queued = asyncio.create_task(client.post("/generate", json={"prompt": "b"}))
            await wait_for(client, lambda s: s["queue_depth"] == 1)
            running.cancel()
            queued.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
            sent += 2
            backend.gate.set()  # set: it holds nothing from now on
            await wait_for(client, lambda s: s["in_flight"] == 0)
            backend.fail_next = [OutOfMemory("Tried to allocate 1.00 GiB")]
            assert (await client.post("/generate", json={"prompt": "oom"})).status == 503
            sent += 1
            await wait_for(client, lambda s: s["in_flight"] == 0 and s["queue_depth"] == 0)
            return sent, await outcomes(client)

    sent, (server, metrics) = asyncio.run(scenario())
    assert server == metrics
    assert sum(server.values()) == sent, server
    assert server["served"] == 22 and server["failed"] == 1
    assert server["cancelled"] == 4 and server["rejected"] == 3 + 6


def test_a_dropped_stream_in_continuous_mode_is_cancelled_once(lm):
    async def scenario():
        from aiohttp.test_utils import TestClient, TestServer
        async with TestClient(TestServer(continuous_app(lm, pages=64))) as client:
            while not (await (await client.get("/")).json())["model_loaded"]:
                await asyncio.sleep(0.01)
            await drop_stream(client, "/v1/completions", {"prompt": "hi", "max_tokens": 1000,
                                                          "ignore_eos": True})
            await wait_for(client, lambda s: s["running"] == 0 and s["waiting"] == 0)
            ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert ok.status == 200
            return await outcomes(client)

    server, metrics = asyncio.run(scenario())
    assert server == metrics == {"served": 1, "failed": 0, "cancelled": 1, "rejected": 0}
