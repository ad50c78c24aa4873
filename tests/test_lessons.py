"""lessons/ is generated from solutions/ and never drifts; blank lessons only say "not attempted"."""
import re
from pathlib import Path

import nbformat
import pytest

from diffusion_checks import NOT_ATTEMPTED_MARK
from tools.colab import badge, has_snippet
from tools.make_exercises import LESSONS, exercise_bytes, solution_paths
from tools.nbrun import cell_errors, cell_text, run_notebook

SOLUTIONS = solution_paths()
CHECK_CALL = re.compile(r"^check_\w+\(", re.MULTILINE)


def test_every_solution_has_a_lesson_and_back():
    assert SOLUTIONS, "no solution notebooks found"
    assert sorted(p.name for p in LESSONS.glob("*.ipynb")) == [p.name for p in SOLUTIONS]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_lesson_is_up_to_date(solution):
    lesson = LESSONS / solution.name
    assert lesson.exists(), f"lessons/{solution.name} is missing: run `python -m tools.make_exercises`"
    assert lesson.read_bytes() == exercise_bytes(solution), (
        f"lessons/{solution.name} differs from what solutions/{solution.name} generates: "
        "edit the solution notebook, then run `python -m tools.make_exercises`")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_blank_lesson_only_raises_not_implemented(solution):
    nb = run_notebook(LESSONS / solution.name)
    errors = cell_errors(nb)
    unexpected = [e for e in errors if e.ename != "NotImplementedError"]
    assert not unexpected, "the blank lesson raises more than NotImplementedError:\n" + "\n".join(
        f"  cell {e.cell_index}: {e.ename}: {e.evalue}" for e in unexpected)
    checks = [c for c in nb.cells if c.cell_type == "code" and CHECK_CALL.search(c.source)]
    assert checks, "the lesson calls no check_*(...)"
    for cell in checks:
        assert NOT_ATTEMPTED_MARK in cell_text(cell), (
            f"this check did not report 'not attempted' on the blank lesson:\n{cell.source}")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_set_up_cell_opens_with_the_colab_lines(solution):
    assert has_snippet(nbformat.read(solution, as_version=4)), (
        f"solutions/{solution.name}: the first code cell must start with tools.colab.SETUP_SNIPPET; "
        "run `python -m tools.colab --apply` then `python -m tools.make_exercises`")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_readme_lesson_map_opens_the_lesson_in_colab(solution):
    readme = (LESSONS.parent / "README.md").read_text(encoding="utf-8")
    assert badge(f"lessons/{solution.name}") in readme, (
        f"README.md's lesson map has no Colab badge for lessons/{solution.name} (tools.colab.badge)")
