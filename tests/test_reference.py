"""The GPU reference a CPU run prints beside its own figures: written only by a GPU run under
`make gpu-outputs` (nbrun), printed only without a GPU, labelled with where it was measured; and
the committed references of notebooks 03, 04 and 08 carry that label and still render with the
tables the notebooks print them with."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.course import continuous_batching, cost_frontier, experiments, notebook

# The table each committed reference is printed with, in notebooks 03, 04 and 08.
COMMITTED = {"serving": experiments.serving_table,
             "concurrency": experiments.concurrency_table,
             "concurrency_ttft": experiments.client_ttft_table,
             "continuous_batching": continuous_batching.table,
             "cost_frontier": cost_frontier.summary_table}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(notebook, "REFERENCE_DIR", tmp_path / "reference")
    return tmp_path


def test_a_gpu_run_under_nbrun_writes_the_reference_and_a_cpu_run_never_does(folders,
                                                                            monkeypatch):
    monkeypatch.setenv(notebook.SAVE_REFERENCE_ENV, "1")
    notebook.save_results("demo", {"model": "m", "rows": [{"x": 1}]})
    assert not (folders / "reference").exists(), "a CPU run must not write the GPU reference"
    saved = json.loads((folders / "results" / "demo.json").read_text())
    assert saved["rows"] == [{"x": 1}] and saved["measured_on"]["model"] == "m"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as nbrun sees it
    monkeypatch.setattr(notebook, "measured_on", lambda model=None: {"card": "a GPU"})
    monkeypatch.delenv(notebook.SAVE_REFERENCE_ENV)
    notebook.save_results("demo", {"model": "m", "rows": []})
    assert not (folders / "reference").exists(), "a learner's GPU run must not either"
    monkeypatch.setenv(notebook.SAVE_REFERENCE_ENV, "1")
    notebook.save_results("demo", {"model": "m", "rows": [{"x": 2}]})
    assert notebook.gpu_reference("demo") == {"model": "m", "rows": [{"x": 2}],
                                              "measured_on": {"card": "a GPU"}}


def test_the_reference_is_printed_beside_a_cpu_run_labelled_and_not_on_a_gpu(folders, capsys,
                                                                            monkeypatch):
    notebook.print_gpu_reference("demo", lambda rows: "TABLE")
    assert "No GPU reference is committed" in capsys.readouterr().out
    (folders / "reference").mkdir()
    where = {"card": "NVIDIA H100 80GB HBM3", "driver": "580", "cuda": "13.0", "torch": "2.11",
             "model": "m", "date": "2026-12-07"}
    (folders / "reference" / "demo.json").write_text(
        json.dumps({"rows": [1, 2], "measured_on": where}))
    assert notebook.print_gpu_reference("demo", lambda rows: f"TABLE {rows}") is None
    out = capsys.readouterr().out
    assert "GPU reference, for comparison: NVIDIA H100 80GB HBM3 (driver 580" in out
    assert "2026-12-07" in out and "not measured here" in out and "TABLE [1, 2]" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    notebook.print_gpu_reference("demo", lambda rows: "TABLE")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_committed_references_name_their_card_and_render(name):
    reference = notebook.gpu_reference(name)
    assert reference is not None, f"notebooks/reference/{name}.json is missing: make gpu-outputs"
    where = reference["measured_on"]
    assert where["card"].startswith("NVIDIA") and where["driver"] and where["date"]
    assert where["model"] and not where["fast_mode"]
    assert COMMITTED[name](reference["rows"]).strip()
