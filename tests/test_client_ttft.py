"""Notebook 04's client-side TTFT: a streamed load test (`loadtest.run(api="openai")`) next to
the server's /metrics histograms over the same requests (`experiments.client_ttft`), its table,
and the "What you saw" lines (`findings.client_ttft`)."""

from __future__ import annotations

import math

import pytest

from labkit.course import experiments, findings
from labkit.engine.request import Result
from labkit.serve.launcher import launch
from labkit.serve.metrics import ServerMetrics

NAN = math.nan


def _metrics_text(observed: list[tuple[float, float, float, float]]) -> str:
    """A real /metrics rendering after answering requests given as (queue ms, engine TTFT ms,
    inference ms, ms in the server)."""
    stats = {"queue_depth": 0, "in_flight": 0, "requests_served": len(observed),
             "busy_seconds": 0.0}
    metrics = ServerMetrics(lambda: stats)
    for queue, ttft, inference, total in observed:
        metrics.observe(Result("text", "prompt", 10, 3, ttft, inference, 20.0, 5.0, "cpu",
                               "model", False, "length", queue_time_ms=queue), total)
    return metrics.render().decode()


def test_server_histograms_reads_the_sums_and_counts_of_the_servers_own_metrics():
    # 100 ms queued, first token 20 ms into a 500 ms generation, 610 ms in the server:
    # the server's TTFT is 610 - (500 - 20) = 130 ms
    totals = experiments.server_histograms(_metrics_text([(100, 20, 500, 610), (0, 20, 500, 505)]))
    assert totals["queue"] == pytest.approx((0.1, 2))
    assert totals["ttft"] == pytest.approx((0.130 + 0.025, 2))


def test_a_streams_ttft_is_when_its_first_chunk_went_out_not_derived_from_its_end():
    """A reader that drains the tail of a stream late stretches the time in the server, not
    the time to the first token: the stream hands over when its first chunk went out."""
    stats = {"queue_depth": 0, "in_flight": 0, "requests_served": 1, "busy_seconds": 0.0}
    metrics = ServerMetrics(lambda: stats)
    result = Result("text", "prompt", 10, 3, 20.0, 500.0, 20.0, 5.0, "cpu", "model", False,
                    "length", queue_time_ms=0.0)
    metrics.observe(result, 5000.0, ttft_ms=30.0)  # 4.5 s of a slow tail after generation
    totals = experiments.server_histograms(metrics.render().decode())
    assert totals["ttft"] == pytest.approx((0.030, 1))


def summary(ttft_mean=700.0, ttft_p95=900.0, itl=8.8, tpot=8.9, requests=10) -> dict:
    """The parts of a LoadTestResult.summary() that a row reads."""
    return {"total_requests": requests, "successful": requests,
            "ttft_ms": {"mean": ttft_mean, "p50": ttft_mean, "p95": ttft_p95, "p99": ttft_p95},
            "itl_ms": {"mean": itl}, "tpot_ms": {"mean": tpot}}


def test_a_row_takes_the_servers_means_between_the_two_scrapes():
    before = {"queue": (5.0, 4), "ttft": (6.0, 4)}  # earlier requests: left out
    after = {"queue": (5.0 + 10 * 0.670, 14), "ttft": (6.0 + 10 * 0.690, 14)}
    row = experiments.client_ttft_row(5, summary(), before, after)
    assert row["queue_ms"] == pytest.approx(670)
    assert row["server_ttft_ms"] == pytest.approx(690)
    assert row["prefill_ms"] == pytest.approx(20)
    assert (row["client_ttft_ms"], row["client_ttft_p95_ms"]) == (700.0, 900.0)
    assert (row["itl_ms"], row["tpot_ms"], row["requests"]) == (8.8, 8.9, 10)
    nothing_new = experiments.client_ttft_row(5, summary(), before, before)
    assert math.isnan(nothing_new["queue_ms"]) and math.isnan(nothing_new["server_ttft_ms"])


def row(concurrency, queue, prefill, client, p95=None, itl=8.8, tpot=8.9) -> dict:
    return {"concurrency": concurrency, "requests": 2 * concurrency,
            "successful": 2 * concurrency, "queue_ms": queue, "prefill_ms": prefill,
            "server_ttft_ms": queue + prefill, "client_ttft_ms": client,
            "client_ttft_p95_ms": p95 or client, "itl_ms": itl, "tpot_ms": tpot}


def test_table_puts_the_server_and_the_client_side_by_side():
    table = experiments.client_ttft_table([row(1, 0.1, 18, 22, 25), row(5, 670, 20, 694, 920,
                                                                       itl=NAN)])
    header, columns, low, high = table.splitlines()[:4]
    assert "in the server" in header and "at the client" in header
    assert columns.split() == ["conc", "reqs", "queue", "ms", "prefill", "ms", "TTFT", "ms", "|",
                               "TTFT", "ms", "p95", "ms", "ITL", "ms", "TPOT", "ms"]
    assert low.split() == ["1", "2", "0", "18", "18", "|", "22", "25", "8.80", "8.90"]
    assert high.split() == ["5", "10", "670", "20", "690", "|", "694", "920", "-", "8.90"]
    assert "send -> first streamed token" in table


def test_findings_split_the_users_wait_into_queue_prefill_and_the_rest():
    text = findings.client_ttft([row(5, 670, 20, 694, 920), row(1, 0, 18, 22)])
    first, second, third = text.splitlines()
    assert first.startswith("- At concurrency 1 ") and "22 ms after sending" in first
    assert "0 ms in the queue, 18 ms of prefill, 4 ms outside the server" in first
    assert "694 ms (p95 920 ms), 32x as long, 97% of it waiting in the queue" in second
    assert "prefill took 18-20 ms at every level" in second
    assert "every 8.8 ms (ITL) at every level" in third


def test_findings_with_one_level_or_uneven_token_gaps():
    [only, itl] = findings.client_ttft([row(1, 0, 18, 22)]).splitlines()
    assert "concurrency 1" in only and "TPOT 8.9 ms" in itl
    uneven = findings.client_ttft([row(1, 0, 18, 22, itl=8.0), row(4, 60, 18, 80, itl=12.0)])
    assert "8.0-12.0 ms (ITL) depending on the level" in uneven
    no_gaps = findings.client_ttft([row(1, 0, 18, 22, itl=NAN)])
    assert len(no_gaps.splitlines()) == 1


@pytest.mark.slow
def test_client_ttft_against_labkit_serve_sees_the_queue_the_server_counts():
    """The embedded model, sequential: at concurrency 2 one request of each pair waits for the
    other's whole generation; the client's TTFT is the server's plus the trip."""
    with launch(model="model", warmup=0) as srv:
        rows = experiments.client_ttft(srv.url, [1, 2], max_tokens=12)
    low, high = rows
    assert [r["successful"] for r in rows] == [2, 4] == [r["requests"] for r in rows]
    # a lone request waits for nothing but the hand-off (a few ms, more on a busy machine)
    assert 5 < high["queue_ms"] and low["queue_ms"] < high["queue_ms"] / 3
    assert high["client_ttft_ms"] > low["client_ttft_ms"]
    for r in rows:
        assert r["client_ttft_ms"] >= r["server_ttft_ms"] - 5  # send before the server sees it
        assert r["prefill_ms"] > 0 and r["itl_ms"] > 0 and r["tpot_ms"] > 0
