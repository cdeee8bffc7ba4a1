"""GET /metrics: Prometheus text that prometheus-client's own parser reads, with vLLM's gauge
names, whose counters and histograms move with the load (stub model, real server)."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client.parser import text_string_to_metric_families
from stub_backend import StubBackend, held_loader
from test_server import VALID, serving, wait_for


async def scrape(client) -> dict[str, float]:
    """{sample name{labels}: value} from one scrape, parsed by prometheus-client."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_metrics_parse_and_carry_the_vllm_gauge_names():
    async def scenario():
        async with serving() as client:
            m = await scrape(client)
            for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                         "vllm:gpu_cache_usage_perc", "labkit_requests_waiting",
                         "labkit_requests_running", "vllm:request_success_total",
                         "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                         "labkit_time_to_first_token_seconds_count",
                         "labkit_time_per_output_token_seconds_count",
                         "labkit_e2e_request_latency_seconds_count",
                         "labkit_request_queue_time_seconds_count"):
                assert m[name] == 0, name
            assert "labkit_gpu_utilization_percent" not in m  # no GPU: no made-up value
    asyncio.run(scenario())


def test_counters_and_histograms_move_with_the_load():
    async def scenario():
        async with serving(StubBackend(delay_s=0.02)) as client:
            for max_tokens in (3, 5, 7):
                reply = await client.post("/generate", json={**VALID, "max_tokens": max_tokens})
                assert reply.status == 200
            assert (await client.post("/generate", json={"prompt": ""})).status == 400
            m = await scrape(client)
            assert m["labkit_requests_total{outcome=served}"] == 3
            assert m["labkit_requests_total{outcome=rejected}"] == 1
            assert m["vllm:request_success_total"] == 3
            assert m["vllm:generation_tokens_total"] == 3 + 5 + 7
            assert m["labkit_prompt_tokens_total"] == 3 * len(VALID["prompt"].split())
            assert m["labkit_e2e_request_latency_seconds_count"] == 3
            assert m["labkit_time_to_first_token_seconds_count"] == 3
            assert m["labkit_e2e_request_latency_seconds_sum"] >= 3 * 0.02
            assert m["labkit_busy_seconds_total"] >= 3 * 0.02
    asyncio.run(scenario())


def test_queue_gauges_show_waiting_and_running_requests():
    backend = StubBackend()
    backend.gate = threading.Event()

    async def scenario():
        async with serving(backend) as client:
            sent = [asyncio.create_task(client.post("/generate", json=VALID)) for _ in range(3)]
            await wait_for(client, lambda s: s["queue_depth"] == 2 and s["in_flight"] == 1)
            m = await scrape(client)
            assert m["vllm:num_requests_waiting"] == 2 == m["labkit_requests_waiting"]
            assert m["vllm:num_requests_running"] == 1 == m["labkit_requests_running"]
            assert m["vllm:gpu_cache_usage_perc"] == 1.0  # sequential: its one slot is taken
            backend.gate.set()
            assert [r.status for r in await asyncio.gather(*sent)] == [200, 200, 200]
            m = await scrape(client)
            assert m["vllm:num_requests_waiting"] == 0 and m["vllm:num_requests_running"] == 0
    asyncio.run(scenario())


def test_metrics_answer_while_the_model_loads():
    slow_loader, release = held_loader(StubBackend())

    async def scenario():
        async with serving(loader=slow_loader, wait=False) as client:
            m = await scrape(client)
            assert m["vllm:num_requests_running"] == 0
            release.set()
    asyncio.run(scenario())
