"""`labkit loadtest --sweep` (labkit.measure.sweep, its plot and its command line): the figures of
a point from hand-made records (tok/s per user, goodput against an SLO, the window), the knee,
the best point, dominance, the JSON file, the table, the frontier PNG; and the command run
against the real labkit server with the stub model (tests/stub_server.py), streamed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import cli
from labkit.measure import frontier_plot, sweep
from labkit.measure.loadstats import LoadTestResult, RequestRecord
from labkit.serve.launcher import ServerProcess

TESTS = Path(__file__).resolve().parent
PNG = b"\x89PNG\r\n\x1a\n"
SLO = sweep.SLO(ttft_p95_ms=100, tokens_per_user=20)  # TPOT at most 50 ms


def record(i: int, ttft_ms: float, tpot_ms: float, tokens: int = 11, ok: bool = True):
    latency = ttft_ms + tpot_ms * (tokens - 1)
    return RequestRecord(index=i, url="u", scheduled_s=0.1 * i, sent_s=0.1 * i,
                         done_s=0.1 * i + latency / 1000, latency_ms=latency,
                         status=200 if ok else 503, ok=ok, tokens_generated=tokens,
                         client_ttft_ms=ttft_ms if ok else None)


def result(records, t0: float = 1000.0) -> LoadTestResult:
    return LoadTestResult(records, {"api": "openai", "t0_perf_counter": t0})


def pt(level, tokens_s, per_user, ttft=50.0, **extra) -> dict:
    return {"kind": "concurrency", "level": level, "output_tokens_per_sec": tokens_s,
            "output_tokens_per_sec_per_gpu": tokens_s, "tokens_per_user": per_user,
            "ttft_p95_ms": ttft, "meets_slo": SLO.point_ok({"ttft_p95_ms": ttft,
                                                           "tokens_per_user": per_user}),
            **extra}


# --- a point ----------------------------------------------------------------------------------

def test_a_point_counts_goodput_request_by_request_and_per_user_speed_from_median_tpot():
    # two within the SLO, one too slow to start, one too slow per token, one failed
    records = [record(0, 40, 10), record(1, 60, 20), record(2, 300, 10), record(3, 40, 80),
               record(4, 40, 10, ok=False)]
    res = result(records)
    p = sweep.point(res, 4, slo=SLO, gpus=2)
    wall = res.wall_time_s()
    assert p["level"] == p["concurrency"] == 4 and p["rate"] is None
    assert p["requests"] == 5 and p["successful"] == 4
    assert p["goodput_rps"] == pytest.approx(2 / wall) and p["goodput_share"] == 2 / 5
    assert p["tpot_p50_ms"] == pytest.approx(15.0)  # the median of 10, 20, 10, 80
    assert p["tokens_per_user"] == pytest.approx(1000 / 15)
    assert p["output_tokens_per_sec_per_gpu"] == pytest.approx(p["output_tokens_per_sec"] / 2)
    assert p["ttft_p95_ms"] > 100 and not p["meets_slo"]  # the slow start is in the p95
    assert p["window_s"] == pytest.approx([1000.0, 1000.0 + max(r.done_s for r in records)])
    fine = sweep.point(result(records[:2]), 2.5, kind="rate", slo=SLO)
    assert fine["meets_slo"] and fine["rate"] == 2.5 and fine["concurrency"] is None


def test_the_slo_on_both_sides_of_each_target():
    assert sweep.SLO.from_tpot(1000, 50) == sweep.SLO(1000, 20)
    assert SLO.tpot_ms == 50 and SLO.request_ok(100, 50) and not SLO.request_ok(101, 10)
    assert not SLO.request_ok(10, 50.1) and not SLO.request_ok(None, 10)
    assert SLO.point_ok({"ttft_p95_ms": 100, "tokens_per_user": 20})
    assert not SLO.point_ok({"ttft_p95_ms": 100.1, "tokens_per_user": 30})
    assert not SLO.point_ok({"ttft_p95_ms": 10, "tokens_per_user": 19.9})
    assert not SLO.point_ok({"ttft_p95_ms": math.nan, "tokens_per_user": 30})
    assert sweep.SLO().point_ok({"ttft_p95_ms": 1e9, "tokens_per_user": 0.1})
    assert SLO.describe() == ("TTFT p95 ≤ 100 ms and ≥ 20 tok/s per user (TPOT ≤ 50.0 ms)")
    assert sweep.SLO(1500).describe() == "TTFT p95 ≤ 1,500 ms" and sweep.SLO().describe() == \
        "no SLO"
    with pytest.raises(ValueError, match="tokens_per_user must be a positive"):
        sweep.SLO(1000, 0)


def test_requests_per_level_and_the_levels_checked():
    assert sweep.requests_at(1, 8) == 8 and sweep.requests_at(64, 8) == 128
    assert sweep.requests_at(2.5, 1) == 5
    assert sweep.check_levels([1, 2, 4]) == [1, 2, 4]
    assert sweep.check_levels([0.5, 2], "rate") == [0.5, 2.0]
    for bad in ([], [0, 1], [1.5], [2, 2]):
        with pytest.raises(ValueError, match="sweep levels"):
            sweep.check_levels(bad)


# --- what the points say ----------------------------------------------------------------------

CURVE = [pt(1, 100, 100), pt(2, 190, 95), pt(4, 360, 90), pt(8, 560, 70, ttft=90),
         pt(16, 700, 44, ttft=400), pt(32, 760, 24, ttft=1200)]


def test_the_knee_is_the_highest_throughput_times_per_user_speed():
    assert sweep.knee(CURVE)["level"] == 8  # 39,200 against 30,800 (16) and 32,400 (4)
    assert sweep.knee([*CURVE, pt(64, 2000, 30)])["level"] == 64  # 60,000
    assert sweep.knee([pt(1, math.nan, 10)]) is None


def test_the_best_point_meets_the_slo_with_the_most_throughput():
    assert sweep.best(CURVE, SLO)["level"] == 8  # 16 and 32 miss the TTFT target
    assert sweep.best(CURVE, sweep.SLO(2000, 20))["level"] == 32
    assert sweep.best(CURVE, sweep.SLO(10, 20)) is None


def test_dominance_on_both_axes_and_on_both_sides():
    assert sweep.dominates(pt(1, 200, 50), pt(2, 100, 50))
    assert not sweep.dominates(pt(1, 200, 49), pt(2, 100, 50))
    assert not sweep.dominates(pt(1, math.nan, 60), pt(2, 100, 50))
    baseline = [pt(1, 30, 45), pt(2, 31, 44)]
    assert sweep.undominated(baseline, by=CURVE) == []  # CURVE's c=1 beats both
    faster_alone = [pt(1, 120, 140), pt(2, 30, 44)]
    assert sweep.undominated(faster_alone, by=CURVE) == [faster_alone[0]]


# --- the file, the table, the plot ------------------------------------------------------------

def doc(points, label="a", slo=SLO) -> dict:
    return sweep.document(points, kind="concurrency", slo=slo, gpus=1,
                          server={"model": "m", "gpu_name": None, "device": "cpu"},
                          config={"api": "openai", "max_tokens": 16}, label=label, url="u")


def test_the_document_round_trips_with_nan_as_null(tmp_path):
    points = [*CURVE, pt(64, 800, math.nan)]
    d = doc(points)
    assert d["knee"] == 8 and d["best"] == 8 and d["levels"][-1] == 64
    assert doc(points, label=None)["label"] == "m on cpu"
    path = sweep.save(d, tmp_path / "s.json")
    assert "NaN" not in path.read_text() and json.loads(path.read_text())["points"][-1][
        "tokens_per_user"] is None
    back = sweep.load(path)
    assert math.isnan(back["points"][-1]["tokens_per_user"])
    assert back["points"][0]["meets_slo"] is True and back["slo"] == SLO.as_dict()
    (tmp_path / "other.json").write_text('{"summary": {}, "records": []}')
    with pytest.raises(ValueError, match="not a `labkit loadtest --sweep` JSON"):
        sweep.load(tmp_path / "other.json")


def test_the_table_marks_the_knee_and_the_best_point_or_nothing():
    text = sweep.table(doc(CURVE))
    line8 = next(line for line in text.splitlines() if line.split()[:1] == ["8"])
    assert line8.endswith("met knee best")
    assert next(line for line in text.splitlines() if line.split()[:1] == ["32"]).endswith(
        "missed")
    bare = sweep.table(doc(CURVE), marks=False).splitlines()
    assert not any(line.endswith(("met", "missed", "knee", "best")) for line in bare[2:-1])
    assert "SLO" not in bare[1] and "knee" not in bare[-1]


def test_the_frontier_png_has_every_curve_the_knee_and_the_slo(tmp_path):
    ours, theirs = doc(CURVE, "labkit"), doc([pt(1, 50, 200), pt(4, 150, 150)], "vllm")
    fig = frontier_plot.plot_frontier([ours, theirs, doc([pt(1, math.nan, 5)], "empty")])
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines() if not line.get_label()
            .startswith("_")] == ["labkit", "vllm", "SLO: ≥ 20 tok/s per user"]
    texts = [t.get_text() for t in left.texts]
    assert "knee (c=8)" in texts and "knee (c=4)" in texts and "c=32" in texts
    assert "SLO: TTFT p95 ≤ 100 ms" in [line.get_label() for line in right.get_lines()]
    assert left.get_xscale() == "log" and left.get_yscale() == "log"
    path = frontier_plot.save_png([ours], tmp_path / "f.png")
    assert Path(path).read_bytes().startswith(PNG)


# --- the command line, against the real server with the stub model ---------------------------

TOKEN_DELAY_S = 0.01


@pytest.fixture(scope="module")
def stub_url():
    """One generation at a time, each token TOKEN_DELAY_S after the last: 100 tok/s per user."""
    command = [sys.executable, str(TESTS / "stub_server.py"), "--token-delay",
               str(TOKEN_DELAY_S)]
    srv = ServerProcess("stub", command=command).start().wait_ready(60)
    yield srv.url
    srv.stop()


def test_loadtest_sweep_writes_the_json_and_the_png(stub_url, tmp_path):
    other = sweep.save(doc(CURVE, "other server"), tmp_path / "other.json")
    out = tmp_path / "stub.json"
    before = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "loadtest", "--sweep", "1,2", "--api", "openai",
         "--url", stub_url, "--requests", "4", "--max-tokens", "8", "--ignore-eos",
         "--slo-ttft-ms", "50", "--slo-tpot-ms", "20", "--json", str(out), "--compare",
         str(other), "--no-progress"], capture_output=True, text=True, timeout=120)
    after = time.perf_counter()
    assert done.returncode == 0, done.stderr
    d = sweep.load(out)
    assert out.with_suffix(".png").read_bytes().startswith(PNG)
    assert f"wrote {out}" in done.stdout and "TTFT p95 ≤ 50 ms" in done.stdout
    assert d["kind"] == "concurrency" and d["levels"] == [1, 2] and d["load"]["api"] == "openai"
    assert d["slo"] == {"ttft_p95_ms": 50.0, "tokens_per_user": 50.0}
    one, two = d["points"]
    assert one["requests"] == one["successful"] == 4 and two["requests"] == 4
    for p in (one, two):  # one at a time: each streams at the stub's speed once it runs
        assert p["tokens_per_user"] == pytest.approx(1 / TOKEN_DELAY_S, rel=0.25)
        assert before < p["window_s"][0] < p["window_s"][1] < after
    assert one["window_s"][1] <= two["window_s"][0]  # the levels one after another
    # at c=2 every other request waits a whole generation (~80 ms) for its turn
    assert one["meets_slo"] and one["goodput_share"] == 1.0
    assert two["ttft_p95_ms"] > 50 and not two["meets_slo"] and two["goodput_share"] < 1
    assert d["best"] == 1


def test_loadtest_sweep_refuses_bad_levels_and_files(stub_url, tmp_path, capsys):
    with pytest.raises(SystemExit) as bad:
        cli.main(["loadtest", "--url", stub_url, "--sweep", "1,x"])
    assert bad.value.code == 2 and "invalid" in capsys.readouterr().err
    assert cli.main(["loadtest", "--url", stub_url, "--sweep", "1", "--rate", "2"]) == 2
    assert "drop --concurrency and --rate" in capsys.readouterr().err
    not_a_sweep = tmp_path / "x.json"
    not_a_sweep.write_text("{}")
    assert cli.main(["loadtest", "--url", stub_url, "--sweep", "1", "--compare",
                     str(not_a_sweep), "--json", str(tmp_path / "s.json")]) == 2
    assert "not a `labkit loadtest --sweep` JSON" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [sweep.loadtest.ServerNotReady("Cannot reach the server"),
                                     KeyboardInterrupt(),
                                     sweep.loadtest.Interrupted(result([]))])  # run's Ctrl-C
def test_a_sweep_that_stops_midway_keeps_and_writes_the_points_before(monkeypatch, tmp_path,
                                                                      capsys, failure):
    """The server dies at the highest load (or the user presses Ctrl-C): the levels measured
    before are printed and written, the JSON says where it stopped, and the exit status is 2."""
    def measure_point(url, level, **options):
        if level > 2:
            raise failure
        res = result([record(i, 40, 10) for i in range(4)])
        return sweep.point(res, level, slo=options["slo"]), res

    monkeypatch.setattr(sweep, "measure_point", measure_point)
    out = tmp_path / "partial.json"
    status = cli.main(["loadtest", "--url", "http://127.0.0.1:9/v1", "--api", "openai",
                       "--sweep", "1,2,4,8", "--json", str(out), "--no-progress"])
    assert status == 2
    d = sweep.load(out)
    assert d["levels"] == [1, 2] and len(d["points"]) == 2
    assert d["stopped"]["level"] == 4
    assert out.with_suffix(".png").read_bytes().startswith(PNG)
    assert "the sweep stopped at concurrency 4" in capsys.readouterr().err
    with pytest.raises(type(failure)):  # nothing measured yet: nothing to keep, the error shows
        sweep.run("http://127.0.0.1:9/v1", [4, 8])


def test_notebook_09s_sweep_command_is_one_the_cli_takes():
    from labkit.course.cost_frontier import Load

    flags = Load(32, min_requests=4, workers=2).flags([1, 2, 4], SLO)
    args = cli.build_parser("loadtest").parse_args(["loadtest", "--url", "http://x", *flags])
    assert (args.sweep, args.max_tokens, args.requests, args.workers) == ([1, 2, 4], 32, 4, 2)
    assert (args.api, args.ignore_eos, args.temperature) == ("openai", True, 0.7)
    assert (args.slo_ttft_ms, args.slo_tokens_per_user) == (100, 20)
    assert Load().cli([1, 2], SLO).startswith("labkit loadtest --url URL/v1 --api openai")

