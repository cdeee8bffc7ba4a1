"""The exercise solutions (checkers strict) and the learner smoke copy run under nbval, as the
course notebooks do in test_notebooks.py (whose docstring says how)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_notebooks import NOTEBOOK_BUDGET_S, run_with_nbval, runs


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_BUDGET_S + 60)
@pytest.mark.parametrize(("group", "path"), runs("solutions", "learner"))
def test_exercise_notebook_runs_with_nbval(group: str, path: Path):
    run_with_nbval(group, path)
