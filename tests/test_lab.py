"""`make lab` starts JupyterLab on the learner's workspace (issues 2 and 23): started in the
background as the Makefile does it (the workspace sync, then JupyterLab), the lab's root holds
`notebooks/` and `exercises/learner/` as the notebooks cite them, then stopped cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
from lab_server import ROOT, contents, exercise_names, notebook_bytes, notebook_names, running_lab

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="`make` is not installed")


def _notebooks_in(lab, folder: str) -> list[str]:
    status, body = lab.get(f"/api/contents/{folder}")
    assert status == 200, f"/api/contents/{folder}: {status} {body[:300]}"
    return sorted(item["name"] for item in json.loads(body)["content"]
                  if item["type"] == "notebook")


def test_make_lab_serves_the_workspace_and_stops_cleanly(tmp_path):
    names = notebook_names()
    if not names:
        pytest.skip("notebooks/ holds no notebook yet")
    before, had_workspace = notebook_bytes(), (ROOT / "workspace").exists()
    with running_lab(tmp_path) as lab:
        # the lab's root mirrors the repository, so the paths the notebooks cite are valid there:
        # notebooks/ with 00 to 09, exercises/learner/ with every exercise
        status, body = lab.get("/api/contents/")
        assert status == 200
        assert {"notebooks", "exercises"} <= {i["name"] for i in json.loads(body)["content"]}
        served = _notebooks_in(lab, "notebooks")
        assert served == names
        assert [n[:2] for n in served] == [f"{i:02d}" for i in range(10)]
        assert _notebooks_in(lab, "exercises/learner") == exercise_names() != []
        assert {"08_continuous_batching.ipynb", "09_cost_frontier.ipynb"} <= set(exercise_names())
        status, page = lab.get(f"/lab/tree/notebooks/{names[0]}")
        assert status == 200
        assert "<title>JupyterLab</title>" in page and '"appName": "JupyterLab"' in page
        assert contents(lab, f"notebooks/{names[-1]}")["type"] == "notebook"
        # token auth is on: without the token the API refuses
        assert lab.get(f"/api/contents/notebooks/{names[0]}", token=False)[0] == 403
    assert lab.process.returncode == 0, lab.log.read_text()[-2000:]
    log = lab.log.read_text()
    assert "Shutting down" in log
    assert f"Workspace: {lab.root}" in log and "never modified" in log
    # the workspace was laid out in tmp_path, not in the checkout; the course is untouched
    assert lab.root.is_relative_to(tmp_path.resolve())
    assert (ROOT / "workspace").exists() == had_workspace
    assert notebook_bytes() == before
