"""Start JupyterLab exactly as `make lab` starts it, in the background, for tests: the real
Makefile target (the workspace sync, then JupyterLab on it) on a free port, with an explicit token
(JUPYTER_TOKEN) and the workspace in the test's tmp dir (LAB_DIR), stopped through the server's
own shutdown API so kernels and the process exit cleanly."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/.installed"  # the Makefile's venv stamp: `-o` stops make from reinstalling


@dataclass
class Lab:
    url: str
    token: str
    process: subprocess.Popen
    log: Path
    root: Path  # the workspace `make lab` laid out and serves (LAB_DIR)

    def get(self, path: str, token: bool = True, timeout: float = 10) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def page(self, path: str) -> str:
        """A URL a browser can open: the token in the query string."""
        return f"{self.url}{path}?token={self.token}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_lab(tmp_path: Path, startup_timeout: float = 60,
                extra_env: dict[str, str] | None = None,
                lab_dir: Path | None = None) -> Iterator[Lab]:
    """`make lab` on a free port; its workspace is `lab_dir`, by default in `tmp_path`: a test
    never creates or touches the checkout's own workspace/."""
    port, token = free_port(), secrets.token_hex(16)
    lab_dir = (lab_dir or tmp_path / "workspace").resolve()
    # Own runtime, workspace and settings folders: no layout saved by an earlier session reopens
    # tabs, and the test's settings below apply only to this server.
    env = {**os.environ, **(extra_env or {}), "JUPYTER_TOKEN": token,
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": _write_settings(tmp_path / "settings")}
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "-o", STAMP, "lab", f"LAB_PORT={port}",
             f"LAB_DIR={lab_dir}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we can stop make and jupyter together
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, process, log, lab_dir)
    try:
        _wait_until_up(lab, startup_timeout)
        yield lab
    finally:
        stop(lab)


# JupyterLab user settings for tests: no autosave (a test writes a notebook only when it saves it,
# as the learner's test does, and then into the workspace, never the committed file), every cell
# in the DOM (the default windowing leaves cells outside the viewport unrendered, so a browser
# test could not see them), no news pop-up.
TEST_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def _write_settings(folder: Path) -> str:
    for name, values in TEST_SETTINGS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return str(folder)


def _wait_until_up(lab: Lab, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"`make lab` exited with {lab.process.returncode}:\n"
                               + lab.log.read_text()[-3000:])
        try:
            if lab.get("/api", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s:\n"
                       + lab.log.read_text()[-3000:])


def stop(lab: Lab, timeout: float = 20) -> None:
    """Ask the server to shut down (kernels too); signal our process group only if it hangs."""
    if lab.process.poll() is None:
        request = urllib.request.Request(lab.url + "/api/shutdown", method="POST", data=b"",
                                         headers={"Authorization": f"token {lab.token}"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
    try:
        lab.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(lab.process.pid, signal.SIGTERM)
        try:
            lab.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(lab.process.pid, signal.SIGKILL)
            lab.process.wait()


def notebook_names() -> list[str]:
    return sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def notebook_bytes() -> dict[Path, bytes]:
    """The committed notebooks and exercises as they are now, to prove a test left them
    untouched."""
    return {p: p.read_bytes()
            for folder in ("notebooks", "exercises/learner", "exercises/solutions")
            for p in sorted((ROOT / folder).glob("*.ipynb"))}


def exercise_names() -> list[str]:
    return sorted(p.name for p in (ROOT / "exercises" / "learner").glob("*.ipynb"))


def contents(lab: Lab, name: str) -> dict:
    status, body = lab.get(f"/api/contents/{name}?content=0")
    assert status == 200, f"/api/contents/{name}: {status} {body[:300]}"
    return json.loads(body)
