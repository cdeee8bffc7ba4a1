"""An outside benchmark client (GuideLLM, the `bench` extra) against a real `labkit serve`:
its request and token counts match the server's own /metrics counters, and
`labkit loadtest --api openai` sent the same prompts counts the same. Skipped where guidellm is
not installed (`pip install -e '.[bench]'`, or $GUIDELLM naming its executable).
benchmarks/outside_client.py is the timing comparison; this is the counting check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from labkit.serve.launcher import launch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("outside_client",
                                               ROOT / "benchmarks" / "outside_client.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

GUIDELLM = bench.find_guidellm()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    GUIDELLM is None, reason="guidellm is not installed: it is in the bench extra "
                             "(pip install -e '.[bench]'), not in dev")]
SHAPE = {"concurrency": 2, "requests": 4, "prompt_tokens": 16, "output_tokens": 8}


def test_guidellm_counts_what_the_server_counts():
    with launch(model="model", device="cpu", mode="sequential", warmup=0,
                env=bench.OFFLINE) as srv:
        benchmark, server = bench.counted(srv.url, lambda: bench.run_guidellm(
            GUIDELLM, srv.url, timeout=120, **SHAPE))
        prompts = bench.guidellm_prompts(benchmark)
        result, server_l = bench.counted(srv.url, lambda: bench.run_labkit(
            srv.url, prompts, **SHAPE))
    outside, ours = bench.guidellm_round(benchmark), bench.labkit_round(result)
    server, server_l = bench.server_view([server]), bench.server_view([server_l])
    tokens = SHAPE["requests"] * SHAPE["output_tokens"]
    assert (outside["successful"], outside["failed"]) == (4, 0), outside["errors"]
    assert server["served"] == 4 and server["rejected"] == server["failed"] == 0
    assert outside["output_tokens"] == server["generation_tokens"] == tokens
    assert 0 < outside["stream_chunks"] <= tokens  # a chunk a token, less partial UTF-8
    assert outside["prompt_tokens"] == server["prompt_tokens"] > 0
    assert len(prompts) == 4
    # the same prompts through labkit's own client: the same counts on both sides
    assert (ours["successful"], ours["failed"]) == (server_l["served"], 0) == (4, 0)
    assert ours["output_tokens"] == server_l["generation_tokens"] == tokens
    assert ours["prompt_tokens"] == server_l["prompt_tokens"] == server["prompt_tokens"]
    # every request timed by both
    assert len(outside["ttft_ms"]) == len(ours["ttft_ms"]) == 4
    assert all(t > 0 for t in outside["ttft_ms"] + outside["itl_ms"])
