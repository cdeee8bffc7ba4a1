"""labkit.measure.loadtest against a server whose delay the test controls (tests/delay_server.py),
and labkit.measure.loadstats' arithmetic on hand-made records."""

from __future__ import annotations

import ast
import asyncio
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from labkit import cli
from labkit.measure import load_client, loadtest
from labkit.measure.loadstats import DEFINITIONS, LoadTestResult, RequestRecord, percentiles
from labkit.serve.launcher import ServerProcess

DELAY_S = 0.2


DELAY_SERVER = Path(__file__).resolve().parent / "delay_server.py"


def delay_server(delay: float, *options: str) -> ServerProcess:
    """tests/delay_server.py with `--delay delay` and `options` (e.g. "--api", "openai")."""
    command = [sys.executable, str(DELAY_SERVER), "--delay", str(delay), *options]
    return ServerProcess("delay", command=command).start().wait_ready(60)


@pytest.fixture(scope="module")
def slow_url():
    """A server that answers every request after exactly DELAY_S, concurrently."""
    srv = delay_server(DELAY_S)
    yield srv.url
    srv.stop()


# --- accuracy ---------------------------------------------------------------------------------

def test_closed_loop_latency_and_throughput_match_the_injected_delay(slow_url):
    concurrency, requests = 4, 40
    result = loadtest.run(slow_url, concurrency=concurrency, requests=requests, progress=False)
    s = result.summary()
    assert s["successful"] == requests and s["failed"] == 0
    assert s["latency_ms"]["mean"] == pytest.approx(DELAY_S * 1000, rel=0.05)
    assert s["latency_ms"]["min"] >= DELAY_S * 1000  # asyncio.sleep never returns early
    assert s["requests_per_sec"] == pytest.approx(concurrency / DELAY_S, rel=0.05)
    assert s["requests_per_min"] == pytest.approx(60 * s["requests_per_sec"])
    assert s["send_lag_ms"]["p50"] < 5 and not s["client_bound"]
    # each worker keeps exactly one request in flight: never more than `concurrency` at once
    assert max_in_flight(result) <= concurrency


def max_in_flight(result: LoadTestResult) -> int:
    events = sorted([(r.sent_s, 1) for r in result.records]
                    + [(r.done_s, -1) for r in result.records])
    return int(np.max(np.cumsum([step for _, step in events])))


@pytest.mark.solo  # sends on time to within 20 ms: a busy neighbour test delays them (CI)
def test_open_loop_follows_the_seeded_poisson_schedule(slow_url):
    rate, requests = 40.0, 60
    result = loadtest.run(slow_url, requests=requests, rate=rate, seed=7, progress=False)
    s = result.summary()
    assert s["successful"] == requests
    assert s["latency_ms"]["mean"] == pytest.approx(DELAY_S * 1000, rel=0.05)
    scheduled = np.array([r.scheduled_s for r in result.records])
    gaps = np.random.default_rng(7).exponential(1 / rate, requests)
    assert scheduled == pytest.approx(np.cumsum(gaps) - gaps[0], abs=1e-6)  # the planned arrivals
    assert s["send_lag_ms"]["p99"] < 20  # ... and they left on time
    assert max_in_flight(result) > 4  # no cap: arrivals do not wait for responses
    assert "open loop, Poisson arrivals at 40 req/s" in result.report()


def test_open_loop_with_a_cap_counts_waiting_for_a_slot_as_latency(slow_url):
    # 40 req/s offered, but only 2 in flight at 0.2 s each = 10 req/s served: requests pile up
    # behind the cap, and their latency (from the scheduled send) must show it.
    result = loadtest.run(slow_url, concurrency=2, requests=20, rate=40.0, progress=False)
    s = result.summary()
    assert s["requests_per_sec"] == pytest.approx(2 / DELAY_S, rel=0.1)
    assert s["latency_ms"]["max"] > 3 * DELAY_S * 1000
    assert s["send_lag_ms"]["p99"] < 20  # waiting for a slot is not the client's lag
    assert max_in_flight(result) == 2


# --- library behaviour -----------------------------------------------------------------------

def test_run_works_inside_a_running_event_loop_like_a_notebook_cell(slow_url):
    async def notebook_cell():
        asyncio.get_running_loop()  # a loop is running here, as in Jupyter
        return loadtest.run(slow_url, concurrency=2, requests=4, progress=False)

    result = asyncio.run(notebook_cell())
    assert result.summary()["successful"] == 4

    async def awaited():
        return await loadtest.arun(slow_url, concurrency=2, requests=2, progress=False)

    assert asyncio.run(awaited()).summary()["successful"] == 2


def test_interrupting_a_notebook_cell_cancels_the_test_instead_of_orphaning_it(slow_url):
    def interrupt(signum, frame):
        raise KeyboardInterrupt  # what "interrupt kernel" does to a running cell

    async def notebook_cell():
        return loadtest.run(slow_url, concurrency=1, requests=100, progress=False)  # ~20 s

    previous = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(notebook_cell())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 3
    assert not [t for t in threading.enumerate() if t.name.startswith("labkit-loadtest")]


def test_urls_round_robin_and_base_urls_mean_generate(slow_url):
    port = slow_url.rsplit(":", 1)[1]
    urls = f"{slow_url}, http://localhost:{port}/generate"
    result = loadtest.run(urls, concurrency=2, requests=6, progress=False)
    assert [r.url for r in result.records] == [f"{slow_url}/generate",
                                               f"http://localhost:{port}/generate"] * 3
    assert result.summary()["successful"] == 6
    assert loadtest.normalize_urls(["http://a:1", "http://b:2/", "http://c:3/x,http://d:4"]) == [
        "http://a:1/generate", "http://b:2/generate", "http://c:3/x", "http://d:4/generate"]
    with pytest.raises(ValueError, match="http"):
        loadtest.normalize_urls("localhost:8000")


def test_warmup_is_sent_but_not_counted(slow_url):
    result = loadtest.run(slow_url, concurrency=2, requests=4, warmup=2, progress=False)
    assert [r.index for r in result.records] == [0, 1, 2, 3]
    assert "2 warm-up request(s) not counted" in result.report()


def test_failures_are_counted_by_type_and_kept_out_of_latency(slow_url):
    wrong_path = slow_url + "/no-such-endpoint"
    result = loadtest.run([slow_url, wrong_path], concurrency=2, requests=6, progress=False)
    s = result.summary()
    assert s["successful"] == 3 and s["failed"] == 3
    assert s["errors_by_type"]["HTTP 404"]["count"] == 3
    assert s["latency_ms"]["min"] >= DELAY_S * 1000  # the fast 404s are not in the latencies
    assert s["success_rate"] == pytest.approx(0.5)
    assert "HTTP 404: 3" in result.report()


def test_timeouts_and_unreachable_servers():
    srv = delay_server(1.0)
    try:
        result = loadtest.run(srv.url, concurrency=2, requests=2, timeout=0.2, progress=False)
        s = result.summary()
        assert s["failed"] == 2 and s["errors_by_type"]["timeout"]["count"] == 2
        assert s["latency_ms"]["p50"] != s["latency_ms"]["p50"]  # NaN: no successes
        assert "Median (p50): n/a" in result.report()
        closed_port = srv.url
    finally:
        srv.stop()
    with pytest.raises(loadtest.ServerNotReady, match="Is the server running"):
        loadtest.run(closed_port, requests=1, progress=False)
    result = loadtest.run(closed_port, requests=2, progress=False, check_ready=False)
    assert result.summary()["errors_by_type"]["connection error"]["count"] == 2


def test_bad_arguments_say_what_is_valid():
    for kwargs, word in [({"concurrency": 0}, "concurrency"), ({"requests": 0}, "requests"),
                         ({"rate": -1.0}, "rate"), ({"timeout": 0}, "timeout"),
                         ({"prompt": ""}, "prompts"), ({"warmup": -1}, "warmup")]:
        with pytest.raises(ValueError, match=word):
            loadtest.run("http://127.0.0.1:9/generate", progress=False, **kwargs)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5])
def test_a_temperature_no_server_takes_is_refused_before_any_request(temperature, capsys):
    # NaN went out as invalid JSON: every request failed with HTTP 400
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        loadtest.run("http://127.0.0.1:9/generate", temperature=temperature, progress=False)
    assert cli.main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1",
                     "--temperature", str(temperature), "--no-progress"]) == 2
    assert "temperature must be a finite number" in capsys.readouterr().err


# A server that answers 200 with a body the report cannot use, chosen by the prompt.
BROKEN_ANSWERS = {
    "fine": '{"tokens_generated": 5, "queue_time_ms": 1, "inference_time_ms": 10.5, '
            '"time_to_first_token_ms": 5, "total_time_ms": null}',
    "string count": '{"tokens_generated": "5", "inference_time_ms": 10}',
    "string time": '{"tokens_generated": 5, "queue_time_ms": "x", "inference_time_ms": 10, '
                   '"time_to_first_token_ms": 5}',
    "nan time": '{"tokens_generated": 5, "inference_time_ms": NaN}',
    "bool count": '{"tokens_generated": true}',
    "empty": "{}",
    "error": '{"error": "the model fell over"}',
}


async def _against_broken_server(**kwargs) -> LoadTestResult:
    async def generate(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        return web.Response(text=BROKEN_ANSWERS[prompt], content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", generate)
    async with TestServer(app) as server:
        return await loadtest.arun(str(server.make_url("/generate")), progress=False,
                                   check_ready=False, **kwargs)


def test_a_200_that_breaks_the_contract_is_a_failed_request_not_a_crash():
    prompts = list(BROKEN_ANSWERS)
    result = asyncio.run(_against_broken_server(prompt=prompts, requests=len(prompts),
                                                concurrency=2))
    s = result.summary()  # a string among the times raised TypeError here
    assert s["successful"] == 1 and s["output_tokens"] == 5
    assert s["errors_by_type"] == {"invalid response": {"count": 6, "example": ANY}}
    errors = {prompts[r.index]: r.error for r in result.records if not r.ok}
    assert errors == {
        "string count": "tokens_generated is not a whole number of tokens: '5'",
        "string time": "queue_time_ms is not a number: 'x'",
        "nan time": "inference_time_ms is not a number: nan",
        "bool count": "tokens_generated is not a whole number of tokens: True",
        "empty": "no tokens_generated in the answer: {}",
        "error": "no tokens_generated in the answer (the model fell over)",
    }
    assert "invalid response: 6" in result.report()


# --- report and statistics --------------------------------------------------------------------

def record(i: int, latency_ms: float, ok: bool = True, **fields) -> RequestRecord:
    return RequestRecord(index=i, url="http://x/generate", scheduled_s=i * 0.1,
                         sent_s=i * 0.1 + 0.001,
                         done_s=i * 0.1 + latency_ms / 1000, latency_ms=latency_ms,
                         status=200 if ok else 503, ok=ok,
                         error_type=None if ok else "HTTP 503",
                         error=None if ok else "Model not loaded", **fields)


def test_statistics_use_linear_percentiles_and_the_design_definitions():
    records = [record(i, lat, tokens_generated=11, queue_time_ms=10.0 * i,
                      inference_time_ms=50.0, server_ttft_ms=10.0)
               for i, lat in enumerate([100.0, 200.0, 300.0, 400.0])]
    records.append(record(4, 5.0, ok=False))
    s = LoadTestResult(records, {"concurrency": 2}).summary()
    assert s["latency_ms"]["p50"] == pytest.approx(250.0)
    assert s["latency_ms"]["p95"] == pytest.approx(385.0)  # 300 + 0.85 * 100
    assert s["latency_ms"]["p99"] == pytest.approx(397.0)
    assert s["latency_ms"]["mean"] == pytest.approx(250.0)
    assert (s["successful"], s["failed"]) == (4, 1)
    assert s["errors_by_type"] == {"HTTP 503": {"count": 1, "example": "Model not loaded"}}
    wall = 0.3 + 0.4  # first scheduled send (0) to the last completion (request 3)
    assert s["total_time_s"] == pytest.approx(wall)
    assert s["requests_per_sec"] == pytest.approx(4 / wall)
    assert s["output_tokens_per_sec"] == pytest.approx(44 / wall)
    # TTFT = latency - (inference - server TTFT) = latency - 40; TPOT = 40 / 10 tokens
    assert s["ttft_ms"]["mean"] == pytest.approx(250.0 - 40.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(4.0)
    assert s["queue_time_ms"]["mean"] == pytest.approx(15.0)
    assert s["send_lag_ms"]["p50"] == pytest.approx(1.0)
    assert percentiles([]) == {"p50": pytest.approx(float("nan"), nan_ok=True),
                               "p95": pytest.approx(float("nan"), nan_ok=True),
                               "p99": pytest.approx(float("nan"), nan_ok=True)}


def test_report_keeps_the_seeds_block_first_then_the_extras():
    records = [record(i, 800.0 + 10 * i, tokens_generated=145, queue_time_ms=0.0,
                      inference_time_ms=800.0, server_ttft_ms=20.0, model="m", device="cpu",
                      synthetic=True) for i in range(50)]
    text = LoadTestResult(records, {"concurrency": 5, "urls": ["http://x/generate"]}).report()
    seed_block = ["=" * 60, "LOAD TEST RESULTS", "=" * 60, "", "Success Rate:",
                  "  Total requests: 50", "  Successful: 50", "  Success rate: 100.0%", "",
                  "Latency (ms):", "  Min: 800", "  Max: 1290", "  Mean: 1045",
                  "  Median (p50): 1045", "  p95: 1266", "  p99: 1285", "", "Throughput:"]
    lines = text.splitlines()
    assert lines[:len(seed_block)] == seed_block
    assert lines[len(seed_block)].startswith("  Total time: ") and lines[
        len(seed_block)].endswith("s")
    assert lines[len(seed_block) + 1].startswith("  Requests/sec: ")
    assert lines[len(seed_block) + 2].startswith("  Requests/min: ")
    assert lines[len(seed_block) + 3] == "=" * 60
    for extra in ("Output tokens/sec", "Queue time (ms)", "TTFT", "Errors by type:",
                  "Client send lag (ms)", "synthetic"):
        assert extra in text
    assert text.index("LOAD TEST RESULTS") < text.index("Output tokens/sec")


def test_client_bound_warning():
    slow_client = [record(i, 50.0) for i in range(10)]
    for r in slow_client:
        r.sent_s = r.scheduled_s + 0.030  # every request left 30 ms late
    result = LoadTestResult(slow_client, {"concurrency": 1})
    assert result.summary()["client_bound"]
    assert "WARNING: the client, not the server, is the bottleneck" in result.report()
    fine = LoadTestResult([record(i, 50.0) for i in range(10)], {"concurrency": 1})
    assert not fine.summary()["client_bound"] and "WARNING" not in fine.report()


def test_dataframe_has_one_row_per_request_with_derived_columns(slow_url):
    result = loadtest.run(slow_url, concurrency=2, requests=4, progress=False)
    df = result.to_dataframe()
    assert len(df) == 4
    for column in ("index", "url", "latency_ms", "status", "ok", "error_type", "queue_time_ms",
                   "tokens_generated", "send_lag_ms", "ttft_ms", "tpot_ms", "scheduled_s"):
        assert column in df.columns
    assert df["latency_ms"].mean() == pytest.approx(result.summary()["latency_ms"]["mean"])


# --- command line -----------------------------------------------------------------------------

def test_the_seeds_command_line_prints_the_report_and_writes_files(slow_url, tmp_path):
    json_file, csv_file = tmp_path / "result.json", tmp_path / "result.csv"
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "loadtest", "--url", slow_url + "/generate",
         "--concurrency", "5", "--requests", "10", "--json", str(json_file),
         "--csv", str(csv_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "LOAD TEST RESULTS" in done.stdout and "Total requests: 10" in done.stdout
    assert "10/10" in done.stderr  # the tqdm progress bar
    document = json.loads(json_file.read_text())
    assert document["summary"]["successful"] == 10 and len(document["records"]) == 10
    assert len(csv_file.read_text().splitlines()) == 11


def test_ctrl_c_reports_and_writes_the_requests_that_ended(slow_url, tmp_path):
    """Interrupted mid-run, the command prints the report of the requests that ended, marked
    so, writes --json, and exits 130, as a shell reports Ctrl-C."""
    json_file = tmp_path / "partial.json"
    run = subprocess.Popen(
        [sys.executable, "-m", "labkit", "loadtest", "--url", slow_url, "--concurrency", "2",
         "--requests", "200", "--no-progress", "--json", str(json_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # the command's start, then ~4 requests a second end
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 130, err
    document = json.loads(json_file.read_text())
    finished = document["summary"]["successful"]
    assert 0 < finished < 200 and len(document["records"]) == finished
    assert f"INTERRUPTED after {finished} of 200 requests" in out
    assert f"Total requests: {finished}" in out


def test_ctrl_c_in_a_script_stops_the_caller_with_what_ended(slow_url):
    """`run` in a script (a sweep, a loop of tests): Ctrl-C raises, as it always did, so the
    caller stops, and the exception carries the requests that ended."""
    script = (f"from labkit.measure import loadtest\n"
              f"try:\n"
              f"    loadtest.run({slow_url!r}, concurrency=2, requests=200, progress=False)\n"
              f"    print('returned')\n"
              f"except loadtest.Interrupted as stop:\n"
              f"    print('interrupted', len(stop.result.records),\n"
              f"          stop.result.config['interrupted']['requested'])\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    said, finished, requested = out.split()
    assert said == "interrupted", err
    assert 0 < int(finished) < 200 and requested == "200"


def test_output_files_that_cannot_be_written_are_refused_before_the_run(slow_url, tmp_path,
                                                                       capsys):
    missing = tmp_path / "no" / "such" / "x.json"
    for flags in (["--concurrency", "1", "--json", str(missing)],
                  ["--concurrency", "1", "--csv", str(tmp_path)],
                  ["--sweep", "1,2", "--json", str(missing)]):
        started = time.monotonic()
        assert cli.main(["loadtest", "--url", slow_url, "--requests", "50", "--no-progress",
                         *flags]) == 2
        assert time.monotonic() - started < 2  # refused at once, not after 10 s of load
        assert "error: cannot write" in capsys.readouterr().err


def test_cli_explain_errors_and_exit_status(slow_url, capsys):
    assert cli.main(["loadtest", "--explain"]) == 0
    assert capsys.readouterr().out.strip() == DEFINITIONS.strip()
    assert cli.main(["loadtest", "--requests", "3"]) == 2
    assert "--url is required" in capsys.readouterr().err
    assert cli.main(["loadtest", "--url", slow_url, "--requests", "2", "--concurrency", "2",
                     "--explain", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "LOAD TEST RESULTS" in out and "Metric definitions" in out
    assert cli.main(["loadtest", "--url", slow_url + "/nope", "--requests", "2",
                     "--no-progress"]) == 1  # some requests failed
    assert cli.main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "2"]) == 2
    assert "Is the server running?" in capsys.readouterr().err


def test_prompts_file_is_read_and_prompts_are_used_in_turn(slow_url, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    assert cli.main(["loadtest", "--url", slow_url, "--prompts-file", str(prompts),
                     "--requests", "2", "--concurrency", "1", "--no-progress"]) == 0
    client = load_client.Client(["http://x/generate"], ["first prompt", "second prompt"], 7, 0.0)
    sent = [json.loads(client.body(i)) for i in range(3)]
    assert [b["prompt"] for b in sent] == ["first prompt", "second prompt", "first prompt"]
    assert sent[0] == {"prompt": "first prompt", "max_tokens": 7, "temperature": 0.0}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["loadtest", "--url", slow_url, "--prompts-file", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_run_in_a_real_jupyter_kernel(slow_url):
    """The notebook path for real: a kernel whose event loop is running, tqdm's widget."""
    import nbclient
    import nbformat

    cells = [
        "import asyncio\nfrom labkit.measure import loadtest\n"
        "asyncio.get_event_loop().is_running()",
        f"result = loadtest.run({slow_url!r}, concurrency=4, requests=8)\nresult",
        "s = result.summary(); (s['successful'], round(s['latency_ms']['mean']))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    outputs = [cell.outputs for cell in nb.cells]
    assert outputs[0][0]["data"]["text/plain"] == "True"  # a loop runs, as in every notebook
    assert any(o["output_type"] == "display_data" for o in outputs[1])  # the progress widget
    assert "LOAD TEST RESULTS" in outputs[1][-1]["data"]["text/plain"]
    successful, mean_ms = ast.literal_eval(outputs[2][0]["data"]["text/plain"])
    assert successful == 8 and mean_ms == pytest.approx(DELAY_S * 1000, rel=0.1)


# --- mixed lengths (--max-tokens 16:0.8,256:0.2) ------------------------------------------------

def test_a_mix_of_lengths_is_parsed_and_split_in_proportion_in_a_seeded_order():
    assert loadtest.parse_max_tokens("16:0.8,256:0.2") == {16: 0.8, 256: 0.2}
    assert loadtest.parse_max_tokens({16: 4, 256: 1}) == {16: 0.8, 256: 0.2}
    assert loadtest.parse_max_tokens("16,256") == loadtest.parse_max_tokens([16, 256]) == {
        16: 0.5, 256: 0.5}
    assert loadtest.parse_max_tokens(150) == loadtest.parse_max_tokens("150") == {150: 1.0}
    for bad, word in [("16:x", "LENGTH:WEIGHT"), ("0", "at least 1"), ("16,16", "twice"),
                      ("16:0", "positive"), (1.5, "whole"), (True, "whole")]:
        with pytest.raises(ValueError, match=word):
            loadtest.parse_max_tokens(bad)
    mix = {16: 0.8, 256: 0.2}
    drawn = loadtest.assign_max_tokens(mix, 50, np.random.default_rng(3))
    assert sorted(drawn) == [16] * 40 + [256] * 10  # exact shares, not a binomial draw
    assert drawn == loadtest.assign_max_tokens(mix, 50, np.random.default_rng(3))
    assert drawn != loadtest.assign_max_tokens(mix, 50, np.random.default_rng(4))
    # shares that do not divide the count: rounded by largest remainder, adding up to it
    assert sorted(loadtest.assign_max_tokens({1: 0.5, 2: 0.25, 3: 0.25}, 7,
                                             np.random.default_rng(0))) == [1, 1, 1, 2, 2, 3, 3]
    assert loadtest.assign_max_tokens({150: 1.0}, 3, None) == [150, 150, 150]


@pytest.fixture(scope="module")
def per_token_url():
    """/generate takes 10 ms + 4 ms per token asked for, and says it generated max_tokens."""
    srv = delay_server(0.01, "--token-delay", "0.004")
    yield srv.url
    srv.stop()


def test_mixed_lengths_in_the_open_loop_keep_the_arrivals_and_report_each_length(per_token_url):
    mix = "4:0.75,60:0.25"
    result = loadtest.run(per_token_url, requests=16, rate=40.0, seed=5, max_tokens=mix,
                          progress=False)
    lengths = [r.max_tokens for r in result.records]
    assert sorted(lengths) == [4] * 12 + [60] * 4
    assert [r.tokens_generated for r in result.records] == lengths  # each asked for its own
    same_seed = loadtest.run(per_token_url, requests=16, rate=40.0, seed=5, max_tokens=mix,
                             progress=False)
    assert [r.max_tokens for r in same_seed.records] == lengths
    plain = loadtest.run(per_token_url, requests=16, rate=40.0, seed=5, progress=False)
    assert [r.scheduled_s for r in plain.records] == pytest.approx(
        [r.scheduled_s for r in result.records], abs=1e-6)  # a mix leaves the arrivals alone
    by_length = result.summary()["by_max_tokens"]
    assert set(by_length) == {4, 60}
    assert by_length[4]["requests"] == 12 and by_length[60]["successful"] == 4
    short, long = by_length[4]["latency_ms"], by_length[60]["latency_ms"]
    assert short["p95"] < 10 + 4 * 4 + 30 < long["p50"]  # 26 ms vs 250 ms of work
    assert by_length[60]["ttft_ms"]["p50"] == pytest.approx(10, abs=15)  # first token: 10 ms
    assert result.for_max_tokens(60).summary()["successful"] == 4
    report = result.report()
    assert "By max_tokens (a mix, order drawn with seed 5):" in report
    assert "max_tokens 4 (75 %) / 60 (25 %)" in report
    line = next(li for li in report.splitlines() if li.split()[:2] == ["60", "4"])
    assert len(line.split()) == 6  # length, requests, p50, p95, TTFT p50, TTFT p95


def test_mixed_lengths_in_the_closed_loop_and_both_apis(per_token_url):
    result = loadtest.run(per_token_url, concurrency=3, requests=8, warmup=2,
                          max_tokens={2: 1, 30: 1}, progress=False)
    assert sorted(r.max_tokens for r in result.records) == [2] * 4 + [30] * 4
    assert result.summary()["successful"] == 8
    client = load_client.Client(["http://x/v1/completions"], ["a", "b"], [5, 9, 5], 0.0,
                              api="openai", model="m")
    sent = [json.loads(client.body(i)) for i in range(3)]
    assert [(b["prompt"], b["max_tokens"], b["stream"]) for b in sent] == [
        ("a", 5, True), ("b", 9, True), ("a", 5, True)]


def test_one_length_keeps_the_report_as_it_was(slow_url):
    result = loadtest.run(slow_url, concurrency=2, requests=4, max_tokens=12, progress=False)
    assert [r.max_tokens for r in result.records] == [12] * 4
    assert result.summary()["by_max_tokens"] is None and result.config["max_tokens"] == 12
    report = result.report()
    assert "By max_tokens" not in report and "max_tokens 12, temperature" in report


def test_cli_takes_a_mix_and_refuses_a_bad_one(per_token_url, capsys):
    assert cli.main(["loadtest", "--url", per_token_url, "--requests", "4", "--concurrency",
                     "2", "--max-tokens", "3:0.5,9:0.5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "By max_tokens" in out and "max_tokens 3 (50 %) / 9 (50 %)" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["loadtest", "--url", per_token_url, "--max-tokens", "3:0.5,x"])
    assert exit_info.value.code == 2
    assert "LENGTH:WEIGHT" in capsys.readouterr().err


def test_a_json_file_reads_back_and_places_its_records_on_this_process_clock(per_token_url,
                                                                              tmp_path):
    from labkit.measure.utilization import loadtest_t0, request_spans

    path = tmp_path / "result.json"
    before = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "loadtest", "--url", per_token_url, "--rate", "50",
         "--requests", "6", "--max-tokens", "2:0.5,20:0.5", "--json", str(path),
         "--no-progress"], capture_output=True, text=True, timeout=60)
    after = time.perf_counter()
    assert done.returncode == 0, done.stderr
    result = LoadTestResult.from_document(json.loads(path.read_text()))
    assert sorted(r.max_tokens for r in result.records) == [2, 2, 2, 20, 20, 20]
    assert result.summary()["successful"] == 6 and set(result.summary()["by_max_tokens"]) == {
        2, 20}
    t0 = loadtest_t0(result)  # the other process's start, on this process's perf_counter
    assert before < t0 < after
    spans = request_spans(result)
    assert all(before < start < end < after for start, end in spans)


def test_the_progress_bar_shows_the_mean_rate_since_the_start_as_the_report_does():
    """Notebook 04's last bar read 2.44 req/s above a report of 1.76: tqdm's default rate is a
    moving average, which ends on the burst of the last completions."""
    import time

    from labkit.measure.loadtest import _progress_bar

    with _progress_bar(10, True, "c=1") as bar:
        time.sleep(0.3)
        bar.update(1)
        for _ in range(9):  # a burst at the end
            bar.update(1)
        shown = bar.format_dict["n"] / bar.format_dict["elapsed"]
        rate = bar.format_dict["rate"] or shown
    assert rate == pytest.approx(shown, rel=0.2) and rate < 40


def _with_open_file_limit(soft: int, hard: int, code: str) -> subprocess.CompletedProcess:
    """`python -c code` in a process whose `ulimit -n` is `soft`, at most `hard`."""
    resource = pytest.importorskip("resource")  # POSIX only
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                (soft, hard)))


def test_the_client_raises_its_open_file_limit_and_says_when_it_is_still_too_low():
    # at ulimit -n 256, concurrency 1000 reported 750-odd "connection error"s, blaming the server
    load = ("import resource; from labkit.measure import loadtest\n"
            "try: loadtest.run('http://127.0.0.1:9', concurrency=1000, requests=1, "
            "progress=False)\nexcept loadtest.ServerNotReady: pass\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    raised = _with_open_file_limit(256, 4096, load)
    assert raised.stdout.split() == ["4096"] and "warning" not in raised.stderr
    low = _with_open_file_limit(256, 256, load)
    assert low.stdout.split() == ["256"]
    assert low.stderr.count("warning: this client may open only 256 files") == 1
    assert "not the server" in low.stderr and "ulimit -n 1032" in low.stderr
