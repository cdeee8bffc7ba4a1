"""labkit.course.deployment: notebook 07's rows -> the three Kubernetes choices, on made-up rows."""

from __future__ import annotations

import importlib

import pytest

from labkit.course.deployment import (
    BATCHED,
    REPLICAS,
    TIME_SLICED,
    choices_table,
    kubernetes_choices,
)


def _row(series, mode, servers, rps, gpu_gb, rss_gb):
    return {"series": series, "mode": mode, "servers": servers, "requests_per_second": rps,
            "gpu_memory_used_gb": gpu_gb, "server_rss_gb": rss_gb,
            "p95_ms": 1.0}  # notebook 07's rows carry more keys: they are ignored


def _gpu_rows():
    return [
        _row("1 x sequential", "sequential", 1, 0.5, 8.0, 2.0),
        _row("2 x sequential", "sequential", 2, 0.8, 15.0, 4.0),
        _row("4 x sequential", "sequential", 4, 0.9, 30.0, 8.0),
        _row("1 x batched", "batched", 1, 10.0, 9.0, 2.2),
    ]


def _cpu_rows():
    return [{**r, "gpu_memory_used_gb": None} for r in _gpu_rows()]


def test_the_three_choices_and_their_arithmetic():
    a, b, c = kubernetes_choices(_gpu_rows(), hourly_price=3.6)  # $0.001 per GPU-second
    assert [x["choice"] for x in (a, b, c)] == [REPLICAS, TIME_SLICED, BATCHED]

    # (a) enough one-GPU replicas of the 1-server row to match the batched server: 10 / 0.5
    assert (a["pods"], a["gpus"], a["from_series"], a["projected"]) == (20, 20, "1 x sequential",
                                                                        True)
    assert a["requests_per_second"] == pytest.approx(10.0)
    assert a["cost_per_hour"] == pytest.approx(72.0)
    assert a["cost_per_1000_requests"] == pytest.approx(72.0 / 3600 / 10.0 * 1000)  # $2.00
    assert (a["memory_per_gpu_gb"], a["memory_per_gpu"]) == (8.0, "8.0 GB")
    assert a["host_memory_per_pod_gb"] == pytest.approx(2.0)

    # (b) the best k-server sequential row, on one GPU
    assert (b["pods"], b["gpus"], b["from_series"], b["projected"]) == (4, 1, "4 x sequential",
                                                                        False)
    assert b["requests_per_second"] == pytest.approx(0.9)
    assert b["memory_per_gpu_gb"] == 30.0
    assert b["host_memory_per_pod_gb"] == pytest.approx(2.0)  # 8 GB over 4 servers
    assert b["cost_per_1000_requests"] == pytest.approx(1.0 / 0.9)

    # (c) the batched row, on one GPU
    assert (c["pods"], c["gpus"], c["from_series"]) == (1, 1, "1 x batched")
    assert c["cost_per_1000_requests"] == pytest.approx(0.1)
    assert c["memory_per_gpu"] == "9.0 GB"


def test_replicas_can_be_chosen_and_default_rounds_up():
    a = kubernetes_choices(_gpu_rows(), 2.0, replicas=3)[0]
    assert (a["pods"], a["gpus"]) == (3, 3)
    assert a["requests_per_second"] == pytest.approx(1.5)
    assert a["cost_per_1000_requests"] == pytest.approx(6.0 / 3600 / 1.5 * 1000)

    rows = _gpu_rows()
    rows[-1]["requests_per_second"] = 1.1  # 1.1 / 0.5 = 2.2 -> 3 replicas
    assert kubernetes_choices(rows, 2.0)[0]["pods"] == 3
    rows[0]["requests_per_second"], rows[-1]["requests_per_second"] = 0.3, 0.9
    assert kubernetes_choices(rows, 2.0)[0]["pods"] == 3  # 0.9 / 0.3 is 3.0000000000000004
    rows[-1]["requests_per_second"] = 0.2  # batched slower than one sequential: still 1 pod
    assert kubernetes_choices(rows, 2.0)[0]["pods"] == 1


def test_cost_matches_labkit_cost_per_1000_requests():
    for name in ("labkit.measure.cost", "labkit.cost"):  # where it lives before/after a move
        try:
            cost = importlib.import_module(name)
            break
        except ModuleNotFoundError:
            continue
    else:
        pytest.skip("labkit's cost module is not importable here")
    for choice in kubernetes_choices(_gpu_rows(), 2.5):
        assert choice["cost_per_1000_requests"] == pytest.approx(
            cost.cost_per_1000_requests(2.5 * choice["gpus"], choice["requests_per_second"]))


def test_cpu_rows_have_no_gpu_memory():
    choices = kubernetes_choices(_cpu_rows(), 1.0)
    assert all(c["memory_per_gpu_gb"] is None and c["memory_per_gpu"] == "n/a (CPU)"
               for c in choices)
    table = choices_table(choices)
    assert "n/a (CPU)" in table and "CPU mode" in table


def test_table_says_where_the_figures_come_from():
    table = choices_table(kubernetes_choices(_gpu_rows(), 3.6))
    assert "rows this notebook measured" in table and "$3.60 per GPU-hour" in table
    assert "projected: 20 x the measured '1 x sequential' row" in table
    assert "measured: the '4 x sequential' row" in table
    assert "measured: the '1 x batched' row" in table
    assert "CPU mode" not in table
    for label in (REPLICAS, TIME_SLICED, BATCHED):
        assert label in table
    assert "2.0000" in table and "0.1000" in table  # $/1k requests of (a) and (c)


@pytest.mark.parametrize("price", [0, -1.0, float("nan"), float("inf"), "three", None, True])
def test_bad_price_is_refused(price):
    with pytest.raises(ValueError, match="hourly_price must be a positive number"):
        kubernetes_choices(_gpu_rows(), price)


@pytest.mark.parametrize("replicas", [0, -2, 1.5, "3", True])
def test_bad_replicas_are_refused(replicas):
    with pytest.raises(ValueError, match="replicas must be a whole number"):
        kubernetes_choices(_gpu_rows(), 1.0, replicas=replicas)


@pytest.mark.parametrize("drop, message", [
    ("1 x sequential", '"1 x sequential" row'),
    ("1 x batched", "batched"),
])
def test_missing_rows_are_named(drop, message):
    rows = [r for r in _gpu_rows() if r["series"] != drop]
    with pytest.raises(ValueError, match=message):
        kubernetes_choices(rows, 1.0)


def test_missing_shared_rows_are_named():
    rows = [r for r in _gpu_rows() if r["servers"] == 1]
    with pytest.raises(ValueError, match="2 or more servers"):
        kubernetes_choices(rows, 1.0)


def test_malformed_rows_are_refused():
    with pytest.raises(ValueError, match="non-empty list"):
        kubernetes_choices([], 1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        kubernetes_choices(None, 1.0)
    rows = _gpu_rows()
    del rows[2]["server_rss_gb"]
    lacks = r"rows\[2\] \('4 x sequential'\) lacks \['server_rss_gb'\]"
    with pytest.raises(ValueError, match=lacks):
        kubernetes_choices(rows, 1.0)
    rows = _gpu_rows()
    rows[0]["requests_per_second"] = 0.0
    with pytest.raises(ValueError, match="requests_per_second must be a measured throughput"):
        kubernetes_choices(rows, 1.0)
    with pytest.raises(ValueError, match="no choices"):
        choices_table([])
