"""`labkit loadtest --api openai`: streamed /v1/completions timed on the client side, against
tests/delay_server.py's OpenAI mode, whose chunk timing the test sets (first chunk with text
after FIRST_S, then one every CHUNK_S), and the arithmetic on hand-made records."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import pytest
from test_loadtest import delay_server, max_in_flight

from labkit import cli
from labkit.measure import load_client, loadtest
from labkit.measure.loadstats import DEFINITIONS, LoadTestResult, RequestRecord

FIRST_S, CHUNK_S, CHUNKS, USAGE_TOKENS = 0.1, 0.04, 5, 9
STREAM_S = FIRST_S + (CHUNKS - 1) * CHUNK_S  # one request, send to [DONE]
KEY = "sk-test-secret-4711"


@pytest.fixture(scope="module")
def stream_url():
    """One model, usage reporting USAGE_TOKENS (not the chunk count: tokens must come from the
    usage), and an empty chunk right after the headers, which must not count as the first
    token. Its /generate answers after FIRST_S."""
    srv = delay_server(FIRST_S, "--api", "openai", "--chunks", str(CHUNKS), "--chunk-delay",
                       str(CHUNK_S), "--usage-tokens", str(USAGE_TOKENS), "--empty-first-chunk")
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def keyed_url():
    """Two models, an API key, and no usage chunk."""
    srv = delay_server(0.02, "--api", "openai", "--models", "a,b", "--api-key", KEY,
                       "--no-usage", "--chunks", "3", "--chunk-delay", "0.01")
    yield srv.url
    srv.stop()


def openai(url, **kwargs) -> LoadTestResult:
    return loadtest.run(url, api="openai", progress=False, **kwargs)


# --- accuracy ---------------------------------------------------------------------------------

def test_client_ttft_itl_and_tokens_match_the_servers_chunk_timing(stream_url):
    requests, concurrency = 12, 4
    result = openai(stream_url, concurrency=concurrency, requests=requests)
    s = result.summary()
    assert s["successful"] == requests and s["api"] == "openai"
    # TTFT: to the first chunk with text, not to the empty chunk sent with the headers
    assert s["ttft_ms"]["mean"] == pytest.approx(FIRST_S * 1000, rel=0.1)
    assert min(r.client_ttft_ms for r in result.records) >= FIRST_S * 1000
    assert s["ttft_source"] == "client-side, first streamed token"
    assert s["itl_ms"]["mean"] == pytest.approx(CHUNK_S * 1000, rel=0.1)
    assert s["itl_ms"]["p50"] == pytest.approx(CHUNK_S * 1000, rel=0.1)
    assert s["latency_ms"]["mean"] == pytest.approx(STREAM_S * 1000, rel=0.1)
    for r in result.records:
        assert (r.chunks, len(r.itl_ms), r.tokens_generated, r.prompt_tokens) == (
            CHUNKS, CHUNKS - 1, USAGE_TOKENS, 7)
        assert r.tokens_from_usage and r.model == "delay-model"
        assert r.ttft_ms == r.client_ttft_ms  # measured, not derived
        assert r.tpot_ms == pytest.approx((r.latency_ms - r.ttft_ms) / (USAGE_TOKENS - 1))
    assert s["output_tokens"] == requests * USAGE_TOKENS
    assert s["stream_chunks"] == requests * CHUNKS
    assert max_in_flight(result) <= concurrency
    text = result.report()
    assert text.splitlines()[:5] == ["=" * 60, "LOAD TEST RESULTS", "=" * 60, "",
                                     "Success Rate:"]
    assert f"(OpenAI API, streaming, {requests * CHUNKS} chunks)" in text
    assert "TTFT (ms, client-side, first streamed token): mean" in text
    for line in ("ITL (ms, between chunks carrying text): mean", "p99", "TPOT (ms per output "
                 "token): mean", "from the server's usage", "OpenAI API, model delay-model"):
        assert line in text
    assert "Server side" not in text  # no queue time or server fields in an OpenAI stream
    assert text.index("LOAD TEST RESULTS") < text.index("OpenAI API, streaming")


def test_open_loop_streams(stream_url):
    result = openai(stream_url, requests=12, rate=30.0, seed=3)
    s = result.summary()
    assert s["successful"] == 12
    assert s["ttft_ms"]["mean"] == pytest.approx(FIRST_S * 1000, rel=0.1)
    assert s["itl_ms"]["mean"] == pytest.approx(CHUNK_S * 1000, rel=0.1)
    assert max_in_flight(result) > 2  # arrivals do not wait for the streams to end
    assert "open loop, Poisson arrivals at 30 req/s" in result.report()


def test_several_urls_round_robin_and_the_openai_url_forms(stream_url):
    port = stream_url.rsplit(":", 1)[1]
    urls = [stream_url, f"http://localhost:{port}/v1/", f"{stream_url}/v1/completions"]
    result = openai(urls, concurrency=3, requests=6)
    assert [r.url for r in result.records] == [
        f"{stream_url}/v1/completions", f"http://localhost:{port}/v1/completions",
        f"{stream_url}/v1/completions"] * 2
    assert result.summary()["successful"] == 6
    assert loadtest.normalize_urls("http://a:1,http://b:2/v1,http://c:3/v1/completions",
                                   "openai") == ["http://a:1/v1/completions",
                                                 "http://b:2/v1/completions",
                                                 "http://c:3/v1/completions"]
    with pytest.raises(ValueError, match="chat completions"):
        loadtest.normalize_urls("http://a:1/v1/chat/completions", "openai")
    with pytest.raises(ValueError, match="drop --api openai"):
        loadtest.normalize_urls("http://a:1/generate", "openai")
    with pytest.raises(ValueError, match="add --api openai"):
        loadtest.normalize_urls("http://a:1/v1")


def test_run_works_inside_a_running_event_loop(stream_url):
    async def notebook_cell():
        return openai(stream_url, concurrency=2, requests=2)

    assert asyncio.run(notebook_cell()).summary()["successful"] == 2


# --- the model --------------------------------------------------------------------------------

def test_the_one_served_model_is_found_and_a_wrong_one_refused(stream_url):
    result = openai(stream_url, concurrency=1, requests=1)
    assert result.config["model"] == "delay-model"
    with pytest.raises(ValueError, match="does not serve model 'nope'; it serves: delay-model"):
        openai(stream_url, requests=1, model="nope")


def test_several_served_models_need_model_and_are_listed(keyed_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(ValueError, match=r"serves several models: a, b\. Choose one with "
                                         "--model"):
        openai(keyed_url, requests=1)
    assert openai(keyed_url, requests=2, model="b").summary()["successful"] == 2


def test_model_is_required_when_the_server_lists_none():
    srv = delay_server(0.0, "--api", "openai", "--no-models-endpoint", "--chunks", "2")
    try:
        with pytest.raises(ValueError, match=r"--model is required.*/v1/models did not list "
                                             r"the served models \(HTTP 404\)"):
            openai(srv.url, requests=1)
        result = openai(srv.url, requests=2, model="delay-model")
        assert result.summary()["successful"] == 2
        assert cli.main(["loadtest", "--api", "openai", "--url", srv.url, "--requests", "1",
                         "--no-progress"]) == 2
    finally:
        srv.stop()


# --- errors -----------------------------------------------------------------------------------

def test_errors_are_counted_by_type_and_kept_out_of_the_latencies(stream_url):
    prompts = ["fine", "!error", "!stream-error", "!cut", "!drop"]
    result = openai(stream_url, concurrency=5, requests=10, prompt=prompts)
    s = result.summary()
    assert s["successful"] == 2
    errors = s["errors_by_type"]
    assert errors["HTTP 400"] == {"count": 2, "example": "BadRequestError: asked for an error"}
    assert errors["error in stream: InternalServerError"]["count"] == 2  # a 200, then an error
    assert errors["incomplete stream"]["count"] == 4  # ended, or broke off, before [DONE]
    cut = {r.error.split(",")[0].split(" without")[0] for r in result.records
           if r.error_type == "incomplete stream"}
    assert cut == {"the stream ended after 1 chunk with text",  # !cut: a clean end
                   "the stream broke off after 1 chunk with text"}  # !drop: connection closed
    # only the two complete streams are in the figures
    assert s["latency_ms"]["min"] >= STREAM_S * 1000
    assert s["stream_chunks"] == 2 * CHUNKS and s["output_tokens"] == 2 * USAGE_TOKENS
    assert min(r.ttft_ms for r in result.ok_records) >= FIRST_S * 1000
    assert "error in stream: InternalServerError: 2" in result.report()

    # a model the server does not know: its 404 body in OpenAI's shape gives the message
    wrong = openai(stream_url, requests=2, model="nope", check_ready=False)
    assert wrong.summary()["errors_by_type"] == {"HTTP 404": {
        "count": 2, "example": "NotFoundError: The model `nope` does not exist."}}

    late = openai(stream_url, concurrency=2, requests=2, timeout=FIRST_S / 2)
    assert late.summary()["errors_by_type"]["timeout"]["count"] == 2


# --- the API key ------------------------------------------------------------------------------

def test_the_api_key_comes_from_the_environment_and_is_never_printed(keyed_url, monkeypatch,
                                                                    tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"HTTP 401.*set \$OPENAI_API_KEY"):
        openai(keyed_url, requests=1, model="a")

    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-0815")
    with pytest.raises(ValueError, match="HTTP 401") as refused:
        openai(keyed_url, requests=1, model="a")
    assert "sk-wrong-0815" not in str(refused.value)  # the server echoed it; we do not
    wrong = openai(keyed_url, requests=2, model="a", check_ready=False)
    error = wrong.summary()["errors_by_type"]["HTTP 401"]
    assert error["count"] == 2 and "***" in error["example"]
    assert "sk-wrong-0815" not in wrong.report() + json.dumps(wrong.summary())

    json_file = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "loadtest", "--api", "openai", "--url", keyed_url,
         "--model", "a", "--requests", "4", "--concurrency", "2", "--no-progress",
         "--json", str(json_file)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OPENAI_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert "API key from OPENAI_API_KEY" in done.stdout
    assert KEY not in done.stdout + done.stderr + json_file.read_text()
    # this server sends no usage: tokens are the chunks, and the report says so
    assert "counted as streamed chunks: the server sent no usage" in done.stdout
    document = json.loads(json_file.read_text())
    summary = document["summary"]
    assert summary["config"]["api_key_from_env"] is True
    assert summary["output_tokens"] == 4 * 3 and summary["responses_without_usage"] == 4
    for figure, keys in (("ttft_ms", ("mean", "p50", "p95", "p99")),
                         ("itl_ms", ("mean", "p50", "p95", "p99")),
                         ("tpot_ms", ("mean", "p50", "p95"))):
        assert all(isinstance(summary[figure][k], float) for k in keys), figure
    assert summary["stream_chunks"] == 12 and summary["ttft_source"].startswith("client-side")
    first = document["records"][0]
    assert first["chunks"] == 3 and len(first["itl_ms"]) == 2
    assert first["tokens_from_usage"] is False and first["ttft_ms"] == first["client_ttft_ms"]


# --- request bodies, the default API, the definitions ------------------------------------------

def test_request_bodies():
    client = load_client.Client(["http://x/v1/completions"], ["p"], 16, 0.0, api="openai",
                              model="m", api_key="k")
    assert json.loads(client.body(0)) == {
        "model": "m", "prompt": "p", "max_tokens": 16, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}}
    assert client.headers["Authorization"] == "Bearer k"
    fixed = load_client.Client(["http://x/v1/completions"], ["p"], 16, 0.0, api="openai",
                             model="m", ignore_eos=True)
    assert json.loads(fixed.body(0))["ignore_eos"] is True
    assert "Authorization" not in fixed.headers


def test_the_generate_api_stays_the_default_and_unchanged(stream_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # sent to /generate too (a locked labkit serve)
    result = loadtest.run(stream_url, concurrency=2, requests=4, progress=False)
    s = result.summary()
    assert s["successful"] == 4 and s["api"] == "generate"
    assert [r.url for r in result.records] == [f"{stream_url}/generate"] * 4
    assert s["ttft_source"] == "derived from the server's fields"
    for r in result.records:  # latency - (inference 100 ms - server TTFT 100 ms)
        assert r.client_ttft_ms is None and r.ttft_ms == r.latency_ms
        assert r.itl_ms is None and r.chunks is None
    assert math.isnan(s["itl_ms"]["mean"]) and s["stream_chunks"] is None
    text = result.report()
    assert "Server side (from response fields):" in text
    assert "TTFT (ms, send -> first token, derived from the server's fields)" in text
    assert "OpenAI" not in text and "chunks" not in text
    client = load_client.Client([f"{stream_url}/generate"], ["p"], 7, 0.0)
    assert json.loads(client.body(0)) == {"prompt": "p", "max_tokens": 7, "temperature": 0.0}
    assert client.headers == {"Content-Type": "application/json"}  # no key given, none sent
    with pytest.raises(ValueError, match="api='openai'"):
        loadtest.run(stream_url, requests=1, model="m", progress=False)


def test_definitions_cover_the_streamed_metrics():
    for word in ("ITL", "client-side, first streamed token", "derived from the server's fields",
                 "usage", "role-only and empty chunks"):
        assert word in DEFINITIONS


def test_streamed_statistics_on_hand_made_records():
    def streamed(i: int, latency: float, ttft: float, gaps: list[float], tokens: int,
                 usage: bool = True) -> RequestRecord:
        return RequestRecord(index=i, url="http://x/v1/completions", scheduled_s=i * 0.1,
                             sent_s=i * 0.1, done_s=i * 0.1 + latency / 1000,
                             latency_ms=latency, status=200, ok=True, client_ttft_ms=ttft,
                             itl_ms=gaps, chunks=len(gaps) + 1, tokens_generated=tokens,
                             tokens_from_usage=usage)

    records = [streamed(0, 100.0, 10.0, [10.0, 20.0], 10),
               streamed(1, 200.0, 20.0, [30.0, 40.0, 50.0], 19, usage=False)]
    s = LoadTestResult(records, {"api": "openai", "model": "m"}).summary()
    assert s["ttft_ms"]["mean"] == pytest.approx(15.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(15.0)
    assert s["itl_ms"]["mean"] == pytest.approx(30.0)  # pooled over both requests
    assert s["itl_ms"]["p50"] == pytest.approx(30.0)
    assert s["itl_ms"]["p95"] == pytest.approx(48.0)  # 40 + 0.8 * 10
    assert s["tpot_ms"]["mean"] == pytest.approx((90.0 / 9 + 180.0 / 18) / 2)
    assert s["stream_chunks"] == 7 and s["responses_without_usage"] == 1
    text = LoadTestResult(records, {"api": "openai", "model": "m"}).report()
    assert "(29 tokens in 2 responses; 1 of them sent no usage" in text
    assert "(OpenAI API, streaming, 7 chunks)" in text


@pytest.mark.parametrize(("usage", "tokens", "prompt_tokens"), [
    ({"completion_tokens": 7, "prompt_tokens": 3}, 7, 3),
    ({"completion_tokens": True, "prompt_tokens": 3}, 4, None),  # a bool is no count: chunks
    ({"completion_tokens": 7, "prompt_tokens": "3"}, 7, None),  # the report adds these up
])
def test_usage_counts_are_taken_only_when_they_are_whole_numbers(usage, tokens, prompt_tokens):
    """The same rule as /generate's token counts (load_client._is_count)."""
    record = RequestRecord(index=0, url="http://x/v1/completions", scheduled_s=0.0, sent_s=0.0,
                           done_s=0.1, latency_ms=100.0, status=200, ok=False)
    load_client._stream_outcome(record, 0.0, 0.01, [1.0, 1.0, 1.0], 4, None, None, True, b"",
                                None, True, usage)
    assert record.ok and record.tokens_generated == tokens
    assert record.tokens_from_usage is (tokens == 7) and record.prompt_tokens == prompt_tokens


@pytest.mark.parametrize(("payload", "plain"), [
    (b'{"choices":[{"index":0,"text":" a","finish_reason":null}]}', True),  # vLLM
    (b'{"choices":[{"index":0,"text":" a","finish_reason":null}],"usage":null}', True),  # OpenAI
    (b'{"choices":[{"text":"\\"error\\": \\"usage\\":{"}]}', True),  # keys inside the text
    (b'{"choices":[{"index":0,"text":"","finish_reason":"length"}]}', False),  # empty
    (b'{"choices":[{"text":"x"}],"usage":{"completion_tokens":3}}', False),  # usage to read
    (b'{"choices":[],"usage":{"completion_tokens":3}}', False),
    (b'{"error":{"message":"x","type":"InternalServerError"}}', False),
    (b'{"choices": [{"text": "x"}]}', False),  # not compact: parsed, to be safe
])
def test_chunks_that_need_no_parsing(payload, plain):
    """The stream reader skips json.loads only for chunks that carry text and nothing else."""
    assert load_client._plain_text_chunk(payload) is plain
    event = json.loads(payload)
    if plain:
        assert event["choices"][0]["text"] and not event.get("usage") and "error" not in event


def test_workers_split_the_load_and_merge_one_report(stream_url):
    result = openai(stream_url, concurrency=6, requests=30, max_tokens=4, workers=3)
    s = result.summary()
    assert s["successful"] == 30 and s["workers"] == 3
    assert sorted(r.index for r in result.records) == list(range(30))
    assert s["stream_chunks"] == 30 * CHUNKS and s["config"]["concurrency"] == 6
    lag = s["client_loop_lag_ms"]
    assert lag["max"] >= lag["p99"] >= lag["p50"] >= 0  # watched in every worker
    assert len(s["config"]["client_loop_lag_ms_by_worker"]) == 3
    assert "Client event-loop lag (ms, 3 processes)" in result.report()


def test_workers_in_an_open_loop_send_on_one_schedule(stream_url):
    alone = openai(stream_url, rate=40, requests=16, max_tokens=2, seed=5)
    split = openai(stream_url, rate=40, requests=16, max_tokens=2, seed=5, workers=2)
    want = loadtest.poisson_arrivals(40, 16, 5)
    for result in (alone, split):
        scheduled = [r.scheduled_s for r in sorted(result.records, key=lambda r: r.index)]
        assert scheduled == pytest.approx(list(want), abs=1e-6)
    with pytest.raises(ValueError, match="at least 4 requests"):
        openai(stream_url, requests=3, workers=4)
