"""The environment files agree with pyproject.toml, and the Dockerfile passes hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]).lower()


def _pins(requirements: list[str]) -> dict[str, str]:
    return {_name(r): r.split("==", 1)[1].strip() if "==" in r else r for r in requirements}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_pins_equal_pyproject(pyproject):
    project = pyproject["project"]
    expected = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    pinned = _pins([r for r in pip_sections[0] if not r.startswith("-")])
    assert pinned == expected, (
        "environment.yml's pip section must pin exactly what pyproject.toml pins "
        f"([project.dependencies] + dev). Only in environment.yml: "
        f"{sorted(set(pinned.items()) - set(expected.items()))}; only in pyproject.toml: "
        f"{sorted(set(expected.items()) - set(pinned.items()))}")
    assert "-e ." in pip_sections[0], "environment.yml should install labkit itself (-e .)"


def test_every_dependency_is_pinned_exactly(pyproject):
    project = pyproject["project"]
    loose = [r for r in project["dependencies"] + project["optional-dependencies"]["dev"]
             if "==" not in r]
    assert not loose, f"pin these with ==: {loose}"


def test_environment_python_satisfies_requires_python(pyproject):
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert _version(python.split("=")[1]) >= _version(minimum)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if found.exists():
        return str(found)
    on_path = shutil.which("hadolint")
    assert on_path, "hadolint is missing: it is a dev dependency (`pip install -e '.[dev]'`)"
    return on_path


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_does_report_findings(tmp_path):
    """Guards the test above: a linter that cannot fail proves nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = _lint(bad)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_dockerfile_keeps_the_course_contract():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M), "base image: a CUDA image"
    assert re.search(r"^EXPOSE 8888 8000$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the container must not run as root"
    assert "make venv" in text, "install the way `make` does"
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and "jupyter lab --ip 0.0.0.0" in " ".join(json.loads(cmd[1]))
    assert "token" not in cmd[1].lower(), "token auth must stay on"
    assert re.search(r"^HEALTHCHECK ", text, re.M)


def test_dockerignore_keeps_the_model_and_drops_the_venv():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    assert not any(p.strip("/*") == "model" for p in ignored), "model/ must go into the image"
