"""`labkit monitor`: dmon-like lines and summary (fake NVML), CSV, CPU mode, the no-GPU message."""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
from fake_nvml import FakeNvml, scripted_stats_server

import labkit.measure.gpu
from labkit import cli
from labkit.measure.monitor import monitor
from labkit.measure.utilization import CPU_MODE_LABEL, NvmlReader, UtilizationSampler

REPO = Path(__file__).resolve().parent.parent


def run_monitor(lib: FakeNvml, count: int, **kwargs) -> tuple[list[str], dict]:
    out = io.StringIO()
    sampler = UtilizationSampler(interval=0.1, reader=NvmlReader(lib))
    summary = monitor(sampler, count, out=out, **kwargs)
    return out.getvalue().splitlines(), summary


def test_lines_like_dmon_and_a_summary():
    utils = [0, 100, 50, 2, 80]
    lines, summary = run_monitor(FakeNvml([{"gpu_util": u} for u in utils]), count=5)
    assert lines[0].startswith("# labkit monitor: Fake GPU 80GB (NVML), every 0.1 s")
    assert lines[1].split() == ["#", "time", "gpu", "mem", "used", "pwr", "sm-clk", "sm-act",
                                "tensor", "dram"]
    assert lines[2].split() == ["#", "s", "%", "%", "GB", "W", "MHz", "%", "%", "%"]
    rows = [line.split() for line in lines[3:8]]
    assert [r[1] for r in rows] == ["0", "100", "50", "2", "80"]
    assert rows[0][:7] == ["0.0", "0", "10", "7.00", "300.0", "1980", rows[0][6]]
    assert [float(r[0]) for r in rows] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4], abs=0.05)
    assert rows[-1][-3:] == ["30.0", "5.0", "12.0"]  # GPM: SM, tensor, DRAM
    tail = "\n".join(lines[8:])
    assert "5 samples over 0.4 s" in tail
    assert "mean GPU utilization: 46.4 %" in tail and "peak 100 %" in tail
    assert "idle: 40.0% of samples under 5 %" in tail
    assert "mean SM activity: 30.0 %" in tail
    assert summary["mean_util"] == pytest.approx(46.4)


def test_missing_values_print_as_dash_and_gpm_less_gpu_says_why():
    lines, _ = run_monitor(FakeNvml([{"gpu_util": None}, {}], gpm=False,
                                    unsupported={"nvmlDeviceGetClockInfo"}), count=2)
    assert "GPM not supported by this GPU" in lines[1]
    assert "sm-act" not in lines[2]
    first, second = lines[4].split(), lines[5].split()
    assert first[1] == "-" and first[5] == "-" and second[1] == "50"
    assert "mean SM activity: not available" in "\n".join(lines)


def test_csv_gets_every_sample(tmp_path):
    path = tmp_path / "samples.csv"
    run_monitor(FakeNvml([{"gpu_util": None}, {"gpu_util": 70}]), count=2, csv_path=str(path))
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert rows[0]["gpu_util"] == "" and rows[1]["gpu_util"] == "70.0"  # missing stays empty
    assert float(rows[1]["elapsed_s"]) == pytest.approx(0.1, abs=0.05)
    assert {"time", "wall_time", "mem_used_gb", "sm_activity"} <= set(rows[0])


def test_ctrl_c_ends_with_the_summary():
    class Interrupting(NvmlReader):
        reads = 0

        def read(self):
            Interrupting.reads += 1
            if Interrupting.reads == 3:
                raise KeyboardInterrupt
            return super().read()

    out = io.StringIO()
    sampler = UtilizationSampler(interval=0.01, reader=Interrupting(FakeNvml()))
    summary = monitor(sampler, None, out=out)
    assert summary["samples"] == 2
    assert "# 2 samples over" in out.getvalue()


def test_cli_cpu_mode_labels_busy_percent(capsys, monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    with scripted_stats_server() as (url, script):
        script += [{"uptime_s": t, "busy_seconds": b, "queue_depth": 0, "in_flight": 1,
                    "requests_served": 3} for t, b in ((1, 0), (2, 1), (3, 1.5), (4, 1.5))]
        assert cli.main(["monitor", "--url", url + "/generate", "--count", "3",
                         "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert CPU_MODE_LABEL in out.splitlines()[0]
    assert out.splitlines()[1].split() == ["#", "time", "busy", "queue", "flight", "served"]
    assert [line.split()[1] for line in out.splitlines()[3:6]] == ["100", "50", "0"]
    assert "mean worker busy (CPU mode, not GPU utilization): 50.0 %" in out
    assert "SM activity" not in out


@pytest.mark.parametrize("body", ["[1, 2]", '"ok"', '{"server": [1]}'])
def test_cli_refuses_a_stats_body_that_is_not_an_object_cleanly(body, capsys, monkeypatch):
    # valid JSON but no object raised AttributeError with a traceback
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    with scripted_stats_server() as (url, script):
        script.append(body)
        assert cli.main(["monitor", "--url", url, "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert f"could not read {url}/stats: not a labkit server's /stats" in err
    assert "Traceback" not in err


def test_a_stats_body_that_is_not_an_object_mid_run_is_a_missing_sample(capsys, monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    with scripted_stats_server() as (url, script):
        script += [{"uptime_s": 1, "busy_seconds": 0, "queue_depth": 2}, "[]",
                   '{"server": "busy"}', {"uptime_s": 3, "busy_seconds": 1, "queue_depth": 1}]
        assert cli.main(["monitor", "--url", url, "--count", "3", "--interval", "0.05"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:6]]
    assert [row[1:3] for row in rows] == [["-", "-"], ["-", "-"], ["50", "1"]]


def test_cli_without_gpu_or_url_explains_and_fails(capsys, monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    assert cli.main(["monitor", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert "NVML is not available" in err and "labkit monitor --url" in err
    assert "Traceback" not in err


def test_cli_with_an_unreachable_server(capsys, monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    assert cli.main(["monitor", "--url", "http://127.0.0.1:9", "--count", "1"]) == 1
    assert "Is `labkit serve` running" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--interval", "0"], ["--count", "0"]])
def test_cli_rejects_bad_flags(flags, capsys):
    assert cli.main(["monitor", *flags]) == 2
    assert "must be" in capsys.readouterr().err


def test_real_command_on_a_machine_without_nvml():
    if labkit.measure.gpu.nvml() is not None:
        pytest.skip("this machine has NVML; the message is for machines without it")
    proc = subprocess.run([sys.executable, "-m", "labkit", "monitor", "--count", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "NVML is not available" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_parses_nvidia_smi_dmon_output():
    spec = importlib.util.spec_from_file_location(
        "monitor_vs_dmon", REPO / "benchmarks" / "monitor_vs_dmon.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dmon = """# gpu     sm    mem    enc    dec    jpg    ofa
# Idx      %      %      %      %      %      %
    0     23      5      0      0      0      0
    0      -      5      0      0      0      0
# gpu     sm    mem    enc    dec    jpg    ofa
# Idx      %      %      %      %      %      %
    0    100     40      0      0      0      0
"""
    assert bench.parse_dmon(dmon) == [23.0, None, 100.0]
    assert bench.mean([23.0, None, 100.0]) == 61.5
