"""`make lab` starts JupyterLab on notebooks/ (issue 2's acceptance): started in the background as
the Makefile does it, the lab page of a notebook fetched, then stopped cleanly."""

from __future__ import annotations

import shutil

import pytest
from lab_server import contents, notebook_names, running_lab

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="`make` is not installed")


def test_make_lab_serves_the_notebooks_and_stops_cleanly(tmp_path):
    names = notebook_names()
    if not names:
        pytest.skip("notebooks/ holds no notebook yet")
    with running_lab(tmp_path) as lab:
        status, page = lab.get(f"/lab/tree/{names[0]}")
        assert status == 200
        assert "<title>JupyterLab</title>" in page and '"appName": "JupyterLab"' in page
        # notebooks/ is the server's root, and every notebook there is served
        assert contents(lab, names[-1])["type"] == "notebook"
        # token auth is on: without the token the API refuses
        assert lab.get(f"/api/contents/{names[0]}", token=False)[0] == 403
    assert lab.process.returncode == 0, lab.log.read_text()[-2000:]
    assert "Shutting down" in lab.log.read_text()
