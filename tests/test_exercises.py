"""`labkit exercises`: learner copies get stubs, stay in sync, and cover every checker."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.cli import main
from labkit.course import answers, exercises

SOLUTIONS = exercises.DEFAULT_SRC
LEARNER = exercises.DEFAULT_OUT


def test_committed_learner_copies_match_their_solutions():
    found = exercises.problems(SOLUTIONS, LEARNER)
    assert not found, "\n".join(found) + "\nRun `labkit exercises build` and commit the result."


def test_every_checker_is_used_by_a_solution_notebook():
    sources = "\n".join(p.read_text() for p in exercises.solution_paths(SOLUTIONS))
    unused = [name for name in answers.EXERCISES if f"answers.{name}(" not in sources]
    assert not unused
    for name, exercise_set in answers.EXERCISES.items():
        text = (SOLUTIONS / f"{exercise_set}.ipynb").read_text()
        assert f"answers.{name}(" in text, f"{name} belongs in {exercise_set}.ipynb"


def test_learner_copies_hold_no_solution_and_no_outputs():
    for path in sorted(LEARNER.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            assert exercises.BEGIN not in cell.source and exercises.END not in cell.source
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
        stubs = sum(c.source.count("# YOUR CODE HERE") for c in nb.cells)
        markers = nbformat.read(SOLUTIONS / path.name, as_version=4)
        blocks = sum(c.source.count(exercises.BEGIN) for c in markers.cells)
        assert stubs >= blocks > 0, path.name


def _solution_notebook() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# An exercise"),
        new_code_cell("from labkit.course import answers\nx = 3"),
        new_code_cell("### BEGIN SOLUTION\nhelper = x * 2\nanswer = helper + 1\n"
                      "### END SOLUTION\nanswers.ms_per_token(answer, 700, 100)",
                      execution_count=2, outputs=[nbformat.v4.new_output(
                          "stream", name="stdout", text="✅ ms_per_token: correct\n")]),
        new_code_cell("for i in range(2):\n    ### BEGIN SOLUTION\n    total = i\n"
                      "    ### END SOLUTION\n    print(total)\nprint(answer)"),
    ])


def test_stub_replaces_exactly_the_names_later_code_reads():
    learner = exercises.learner_notebook(_solution_notebook(), "../solutions/x.ipynb")
    third, fourth = learner.cells[2], learner.cells[3]
    assert third.source == ("answer = None  # YOUR CODE HERE\n"
                            "answers.ms_per_token(answer, 700, 100)")
    assert "helper" not in third.source  # an intermediate of the solution is not revealed
    assert third.outputs == [] and third.execution_count is None
    assert fourth.source.splitlines()[1] == "    total = None  # YOUR CODE HERE"
    assert learner.metadata["labkit"]["generated_from"] == "../solutions/x.ipynb"


def test_a_stub_with_nothing_to_assign_is_a_comment():
    source = "### BEGIN SOLUTION\nprint('work')\n### END SOLUTION"
    assert exercises.strip_solutions(source, "") == "# YOUR CODE HERE"


@pytest.mark.parametrize(("source", "message"), [
    ("### BEGIN SOLUTION\nx = 1", "matching"),
    ("x = 1\n### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "matching"),
    ("### BEGIN SOLUTION\nx = (\n### END SOLUTION", "does not parse"),
])
def test_bad_markers_name_the_problem(source, message):
    with pytest.raises(exercises.ExerciseSourceError, match=message):
        exercises.strip_solutions(source, "", "x.ipynb, cell 3")


def test_learner_copy_of_a_stub_runs_and_says_not_answered(capsys):
    learner = exercises.learner_notebook(_solution_notebook(), "x.ipynb")
    namespace: dict = {}
    for cell in learner.cells[1:3]:
        exec(cell.source, namespace)  # the generated stub code is what is under test
    assert "not answered yet" in capsys.readouterr().out


@pytest.fixture
def exercise_dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, out = tmp_path / "solutions", tmp_path / "learner"
    src.mkdir()
    nbformat.write(_solution_notebook(), src / "01_x.ipynb")
    return src, out


def test_cli_check_fails_until_build_and_again_after_an_edit(exercise_dirs, capsys):
    src, out = exercise_dirs
    args = ["--src", str(src), "--out", str(out)]
    assert main(["exercises", "check", *args]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["exercises", "build", *args]) == 0
    assert main(["exercises", "check", *args]) == 0
    learner = out / "01_x.ipynb"
    learner.write_text(learner.read_text().replace("None  # YOUR CODE HERE", "4"))
    assert main(["exercises", "check", *args]) == 1
    assert "differs" in capsys.readouterr().err
    shutil.copy(learner, out / "99_orphan.ipynb")
    assert main(["exercises", "build", *args]) == 0
    assert main(["exercises", "check", *args]) == 1
    assert "has no solution notebook" in capsys.readouterr().err


def test_build_is_deterministic(exercise_dirs):
    src, out = exercise_dirs
    first = exercises.build(src, out)[0].read_text()
    assert exercises.build(src, out)[0].read_text() == first
    assert re.search(r'"generated_from": "\.\./solutions/01_x\.ipynb"', first)


def test_cli_reports_a_missing_source_directory(tmp_path, capsys):
    assert main(["exercises", "check", "--src", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
