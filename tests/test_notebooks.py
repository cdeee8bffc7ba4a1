"""Every notebook runs: the course notebooks, the exercise solutions and the learner copies, each
through nbval (`--nbval-lax`, the current environment's kernel, a per-cell timeout) in CI fast
mode. The committed course notebooks' stored outputs must come from one clean top-to-bottom run.

Learner copies are generated from the solutions by `labkit exercises build` (test_exercises
checks they are in sync, and that a blank answer reaches its checker as "not answered"), so they
differ from a solution only in their blank answer cells. Running every one of them doubled the
exercises' share of `make test`; one learner copy runs here as the smoke test of that path.

Fast mode: CI_ENV below is set for every run; notebooks read it through `labkit.course.notebook`
(`course.fast_mode()` is True under LABKIT_CI=1, and `course.param("name", default)` reads
LABKIT_NAME), so CI executes the same cells with smaller numbers. Solutions also run with
LABKIT_CHECK_STRICT=1, so a checker that does not say ✅ fails the notebook; learner copies run
without it and must run from top to bottom with every answer still blank.

`python -m pytest -m "not slow"` leaves the notebook runs out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_ENV = {"LABKIT_CI": "1"}
GROUPS: dict[str, tuple[Path, dict[str, str]]] = {
    "notebooks": (ROOT / "notebooks", {}),
    "solutions": (ROOT / "exercises" / "solutions", {"LABKIT_CHECK_STRICT": "1"}),
    "learner": (ROOT / "exercises" / "learner", {}),
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in kernel tracebacks
CELL_TIMEOUT_S = 180
NOTEBOOK_BUDGET_S = 300  # the budget is 3 minutes a notebook; this leaves headroom
# Every course notebook is committed with the outputs of its GPU run: one without fails.
REQUIRE_STORED_OUTPUTS = True


def _notebooks(group: str) -> list[Path]:
    folder = GROUPS[group][0]
    return sorted(folder.glob("*.ipynb")) if folder.is_dir() else []


LEARNER_SMOKE = {"01_memory.ipynb"}  # the learner copy that runs (see the docstring)


def runs(*groups: str) -> list:
    """The nbval runs of these groups. The exercises' runs are in test_exercise_notebooks.py:
    a file of their own, so `make test` (pytest-xdist, a worker per file) runs them beside the
    course notebooks."""
    return [pytest.param(group, path, id=f"{group}/{path.name}")
            for group in groups for path in _notebooks(group)
            if group != "learner" or path.name in LEARNER_SMOKE]


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_BUDGET_S + 60)
@pytest.mark.parametrize(("group", "path"), runs("notebooks"))
def test_notebook_runs_with_nbval(group: str, path: Path):
    run_with_nbval(group, path)


def run_with_nbval(group: str, path: Path) -> None:
    env = {**os.environ, **CI_ENV, **GROUPS[group][1]}
    if group != "solutions":
        env.pop("LABKIT_CHECK_STRICT", None)
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
               f"--nbval-cell-timeout={CELL_TIMEOUT_S}", "-p", "no:cacheprovider",
               "-o", "addopts=", "-q", "--no-header", str(path)]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=NOTEBOOK_BUDGET_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{path.name} ran past its {NOTEBOOK_BUDGET_S} s budget:\n"
                    f"{(err.stdout or '')[-3000:]}")
    report = ANSI.sub("", result.stdout[-8000:] + result.stderr[-2000:])
    assert result.returncode == 0, (
        f"{path.relative_to(ROOT)} failed under nbval (env {CI_ENV | GROUPS[group][1]}):\n{report}")


def stored_output_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why these stored outputs are not those of one clean top-to-bottom run ([] if they are).
    Cells with no source are ignored: a run leaves them without a count."""
    cells = [(i, c) for i, c in enumerate(nb.cells, 1)
             if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for _, c in cells]
    problems = [f"cell {i}: not executed" for i, c in cells if c.execution_count is None]
    if not problems and counts != list(range(1, len(counts) + 1)):
        problems.append(f"execution counts {counts} are not 1, 2, 3, …: cells were run out of "
                        "order or more than once; restart the kernel and run all")
    for i, cell in cells:
        for output in cell.outputs:
            if output.output_type == "error":
                problems.append(f"cell {i}: stored error {output.ename}: {output.evalue}")
    return problems


def _never_executed(nb: nbformat.NotebookNode) -> bool:
    return all(c.execution_count is None and not c.outputs
               for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", _notebooks("notebooks"), ids=lambda p: p.name)
def test_committed_notebook_outputs_come_from_a_clean_run(path: Path):
    nb = nbformat.read(path, as_version=4)
    if _never_executed(nb) and not REQUIRE_STORED_OUTPUTS:
        pytest.skip(f"{path.name} is committed without outputs (not yet run on the GPU machine)")
    problems = stored_output_problems(nb)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_stored_output_check_catches_bad_runs():
    """Guards the test above against passing everything."""
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    def notebook(counts, error=False):
        cells = [new_code_cell(f"x = {n}", execution_count=n) for n in counts]
        if error:
            cells[-1].outputs = [new_output("error", ename="ValueError", evalue="bad",
                                            traceback=[])]
        return new_notebook(cells=cells)

    assert stored_output_problems(notebook([1, 2, 3])) == []
    assert "out of order" in stored_output_problems(notebook([1, 3, 2]))[0]
    assert "out of order" in stored_output_problems(notebook([4, 5, 6]))[0]
    assert "not executed" in stored_output_problems(notebook([1, None, 3]))[0]
    assert "ValueError" in stored_output_problems(notebook([1, 2], error=True))[0]


MAX_CELL_LINES = 12


@pytest.mark.parametrize("path", _notebooks("notebooks"), ids=lambda p: p.name)
def test_course_notebooks_are_narrative_short_cells_and_no_helpers(path: Path):
    """The logic lives in labkit, where it is tested: a course notebook's code cells call it,
    define no functions or classes, and stay short enough to read at a glance."""
    import ast

    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells, 1):
        if cell.cell_type != "code":
            continue
        lines = cell.source.strip().splitlines()
        assert len(lines) <= MAX_CELL_LINES, f"{path.name} cell {i}: {len(lines)} lines"
        code = "\n".join(line for line in lines if not line.rstrip().endswith("??"))
        defined = [type(node).__name__ for node in ast.walk(ast.parse(code))
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defined, f"{path.name} cell {i} defines {defined}: put it in labkit"
