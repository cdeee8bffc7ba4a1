"""The learner's workspace (`labkit.course.workspace`, what `make lab` opens): copies made once and
never overwritten, untouched copies follow the course, edited ones are kept with the command that
takes the new version. Every test works on a course and a workspace in tmp dirs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from labkit.course import workspace

NOTEBOOK = "notebooks/04_load_test_concurrency.ipynb"


@pytest.fixture
def course(tmp_path) -> Path:
    """A repository-like tree with a notebook, an exercise and its solution."""
    root = tmp_path / "repo"
    for rel in (NOTEBOOK, "exercises/learner/08_x.ipynb", "exercises/solutions/08_x.ipynb"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f'{{"v": 1, "file": "{rel}"}}\n')
    (root / "notebooks" / "notes.txt").write_text("not a notebook")
    return root


def _sync(course: Path, into: Path) -> list[str]:
    said: list[str] = []
    workspace.sync(course, into, say=said.append)
    return said


def test_first_sync_mirrors_the_repository_paths(course, tmp_path):
    into = tmp_path / "ws"
    said = _sync(course, into)
    copied = sorted(p.relative_to(into).as_posix() for p in into.rglob("*.ipynb"))
    assert copied == ["exercises/learner/08_x.ipynb", "exercises/solutions/08_x.ipynb", NOTEBOOK]
    assert (into / NOTEBOOK).read_bytes() == (course / NOTEBOOK).read_bytes()
    assert not (into / "notebooks" / "notes.txt").exists()
    text = "\n".join(said)
    assert str(into.resolve()) in text and "never modified" in text and "3 notebooks" in text


def test_a_copy_is_never_overwritten_and_the_course_never_modified(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    before = {p: p.read_bytes() for p in course.rglob("*") if p.is_file()}
    (into / NOTEBOOK).write_text("my answers")
    said = _sync(course, into)
    assert (into / NOTEBOOK).read_text() == "my answers"
    assert "every copy is up to date" in said[-1]
    assert {p: p.read_bytes() for p in course.rglob("*") if p.is_file()} == before


def test_cited_documents_are_copied_in_fresh_and_results_is_the_repositorys(course, tmp_path):
    (course / "benchmarks").mkdir()
    (course / "benchmarks" / "RESULTS.md").write_text("# results, first\n")
    (course / "README.md").write_text("readme\n")
    into = tmp_path / "ws"
    said = "\n".join(_sync(course, into))
    assert (into / "benchmarks" / "RESULTS.md").read_text() == "# results, first\n"
    assert (into / "README.md").read_text() == "readme\n" and "benchmarks/RESULTS.md" in said
    assert not (into / "ARCHITECTURE.md").exists()  # not in this repository: nothing to copy
    (course / "benchmarks" / "RESULTS.md").write_text("# results, second\n")
    _sync(course, into)
    assert (into / "benchmarks" / "RESULTS.md").read_text() == "# results, second\n"
    (into / "results" / "baseline.json").write_text("{}")  # what a notebook in the lab saves
    assert (course / "results" / "baseline.json").read_text() == "{}"


def test_every_file_a_notebook_cites_opens_from_the_workspace():
    """A path a notebook or exercise names (benchmarks/RESULTS.md, ...) is a notebook, a result
    it saves, or one of the copied references: the lab cannot reach anything else."""
    import re

    root = workspace.REPO_ROOT
    cited = set()
    for notebook in [*root.glob("notebooks/*.ipynb"), *root.glob("exercises/*/*.ipynb")]:
        cited |= set(re.findall(r"(?<![/\w.])((?:[\w-]+/)*[\w-]+\.(?:md|py|json|yaml))\b",
                                notebook.read_text()))
    for rel in sorted(cited):
        if (root / rel).is_file() and not rel.startswith("results/"):
            assert rel in workspace.REFERENCES, f"{rel} is cited but not in REFERENCES"


def test_an_untouched_copy_takes_the_upstream_change(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    (course / NOTEBOOK).write_text('{"v": 2}\n')
    said = _sync(course, into)
    assert (into / NOTEBOOK).read_text() == '{"v": 2}\n'
    assert any(line.strip().startswith(f"updated: {NOTEBOOK}") for line in said)
    assert _sync(course, into)[-1].strip() == "every copy is up to date"


def test_an_edited_copy_is_kept_and_the_message_names_the_reset_command(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    (into / NOTEBOOK).write_text("my answers")
    (course / NOTEBOOK).write_text('{"v": 2}\n')
    said = "\n".join(_sync(course, into))
    assert (into / NOTEBOOK).read_text() == "my answers"
    assert f"changed upstream: {NOTEBOOK}" in said
    assert f"make lab-reset NOTEBOOK={NOTEBOOK} LAB_DIR={into.resolve()}" in said
    # said again at every sync until the learner takes it
    assert f"changed upstream: {NOTEBOOK}" in "\n".join(_sync(course, into))


def test_the_default_workspace_needs_no_lab_dir_in_the_command():
    assert workspace.reset_command(NOTEBOOK, workspace.DEFAULT_INTO) == \
        f"make lab-reset NOTEBOOK={NOTEBOOK}"


def test_reset_moves_the_learners_copy_aside_and_takes_the_new_version(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    (into / NOTEBOOK).write_text("my answers")
    (course / NOTEBOOK).write_text('{"v": 2}\n')
    now = datetime(2026, 12, 2, 9, 30, 5)
    kept = workspace.reset(NOTEBOOK, course, into, say=lambda _: None, now=now)
    assert kept == into / "notebooks" / "04_load_test_concurrency.mine-20261202-093005.ipynb"
    assert kept.read_text() == "my answers"
    assert (into / NOTEBOOK).read_text() == '{"v": 2}\n'
    # a second reset within the same second keeps both of the learner's copies
    (into / NOTEBOOK).write_text("more answers")
    again = workspace.reset(NOTEBOOK, course, into, say=lambda _: None, now=now)
    assert again != kept and again.read_text() == "more answers" and kept.exists()
    # and the copy now counts as untouched: the next upstream change replaces it
    (course / NOTEBOOK).write_text('{"v": 3}\n')
    _sync(course, into)
    assert (into / NOTEBOOK).read_text() == '{"v": 3}\n'


def test_reset_takes_a_workspace_path_or_a_bare_name(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    (into / NOTEBOOK).write_text("mine")
    assert workspace.reset(str(into / NOTEBOOK), course, into, say=lambda _: None)
    assert workspace.resolve("04_load_test_concurrency.ipynb", course, into) == NOTEBOOK
    with pytest.raises(ValueError, match="or"):  # in learner/ and solutions/: say which
        workspace.resolve("08_x.ipynb", course, into)
    with pytest.raises(ValueError, match="not one of the course's notebooks"):
        workspace.resolve("notebooks/99_nope.ipynb", course, into)


def test_a_new_upstream_notebook_is_copied_in_and_announced(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    new = course / "notebooks" / "09_new.ipynb"
    new.write_text('{"new": true}\n')
    said = _sync(course, into)
    assert (into / "notebooks" / "09_new.ipynb").read_bytes() == new.read_bytes()
    assert any(line.strip() == "new: notebooks/09_new.ipynb" for line in said)


def test_the_manifest_survives_and_a_lost_one_overwrites_nothing(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    manifest = json.loads((into / workspace.MANIFEST).read_text())["copied"]
    assert manifest[NOTEBOOK] == workspace.sha256(course / NOTEBOOK)
    (into / NOTEBOOK).write_text("my answers")
    _sync(course, into)
    assert json.loads((into / workspace.MANIFEST).read_text())["copied"] == manifest
    # without its manifest the workspace still keeps the learner's work, and says so once
    (into / workspace.MANIFEST).unlink()
    (course / NOTEBOOK).write_text('{"v": 2}\n')
    said = "\n".join(_sync(course, into))
    assert (into / NOTEBOOK).read_text() == "my answers"
    assert f"kept your {NOTEBOOK}" in said and "make lab-reset" in said
    assert "kept your" not in "\n".join(_sync(course, into))
    (into / workspace.MANIFEST).write_text("{broken")  # a damaged one: the same, no crash
    assert f"kept your {NOTEBOOK}" in "\n".join(_sync(course, into))
    assert (into / NOTEBOOK).read_text() == "my answers"


def test_a_deleted_copy_comes_back(course, tmp_path):
    into = tmp_path / "ws"
    _sync(course, into)
    (into / NOTEBOOK).unlink()
    assert f"restored: {NOTEBOOK}" in "\n".join(_sync(course, into))
    assert (into / NOTEBOOK).exists()


def test_command_line_sync_and_reset(course, tmp_path, capsys):
    into = tmp_path / "ws"
    assert workspace.main(["sync", "--root", str(course), "--into", str(into)]) == 0
    assert "Workspace:" in capsys.readouterr().out
    (into / NOTEBOOK).write_text("mine")
    assert workspace.main(["reset", NOTEBOOK, "--root", str(course), "--into", str(into)]) == 0
    assert "kept as notebooks/04_load_test_concurrency.mine-" in capsys.readouterr().out
    assert workspace.main(["reset", "nope.ipynb", "--root", str(course),
                           "--into", str(into)]) == 2
    assert "not one of the course's notebooks" in capsys.readouterr().err
