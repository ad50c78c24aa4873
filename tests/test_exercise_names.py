"""One name per exercise: the notebook heading, the check's own name and the grader's agree.

In every solution notebook each check call ``check_xxx(...)`` sits under a heading
``## Exercise N · <title>`` that reads exactly ``diffusion_checks.check_xxx.exercise`` once
backticks and ``$`` are removed (the grader reads headings the same way); the exercises of a
lesson are numbered 1, 2, 3, ... in order, no two share a title, each has a check, and
sections that are not exercises carry no number.
"""
import re
from collections import Counter
from types import SimpleNamespace

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import diffusion_checks
from tools.grade import CHECK_CALL, EXERCISE_HEADING, markdown_headings
from tools.make_exercises import solution_paths

EXERCISE = re.compile(r"^Exercise (\d+) · (\S.*)$")
NUMBERED = re.compile(r"^\d+(\.\d+)*\.?(\s|$)|^\d+\s*·")  # "4 · Training", "2. Sampling"


def exercise_name_problems(nb, checks=diffusion_checks) -> list[str]:
    """What breaks the naming rules in notebook ``nb`` (empty when nothing does)."""
    problems: list[str] = []
    section = None  # the "## " heading the cell is under
    exercises: list[tuple[int, str, list[str]]] = []  # (number, name, its check calls)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for level, name in markdown_headings(cell.source):
                if level <= 2:
                    section = name if level == 2 else None
                if EXERCISE_HEADING.match(name) or (level > 1 and NUMBERED.match(name)):
                    match = EXERCISE.match(name)
                    if level != 2 or not match:
                        problems.append(f"heading {'#' * level} {name!r}: an exercise heading "
                                        "reads `## Exercise N · <title>`; other sections "
                                        "carry no number")
                    if level == 2 and match:
                        exercises.append((int(match.group(1)), name, []))
            continue
        if cell.cell_type != "code":
            continue
        for call in CHECK_CALL.findall(cell.source):
            expected = getattr(getattr(checks, call, None), "exercise", None)
            if expected is None:
                problems.append(f"{call}(...): diffusion_checks has no such check with an "
                                "`.exercise` name")
            in_exercise = bool(exercises) and section == exercises[-1][1]
            if not in_exercise:
                under = f"the heading {section!r}" if section else "no heading"
                problems.append(f"{call}(...) is under {under}, not under an "
                                "`## Exercise N · ...` heading"
                                + (f" (it should be `## {expected}`)" if expected else ""))
                continue
            exercises[-1][2].append(call)
            if expected is not None and section != expected:
                problems.append(f"{call}(...) is under `## {section}`, but its check names the "
                                f"exercise {expected!r}: the heading must read `## {expected}` "
                                "(backticks or $ may go around code or maths)")
    numbers = [number for number, _, _ in exercises]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"exercises are numbered {numbers}, not 1, 2, 3, ... in order")
    titles = Counter(EXERCISE.match(name).group(2) for _, name, _ in exercises)
    problems.extend(f"two exercises are both called {title!r}"
                    for title, count in titles.items() if count > 1)
    problems.extend(f"`## {name}` has no check call under it"
                    for _, name, calls in exercises if not calls)
    return problems


# ── The rule itself, on small synthetic notebooks ────────────────────────────────────


def _check(exercise):
    def check(fn):
        return True

    check.exercise = exercise
    return check


FAKE_CHECKS = SimpleNamespace(
    check_linear=_check("Exercise 1 · The linear schedule"),
    check_q_sample=_check("Exercise 2 · q_sample: jump straight to step t"),
    check_alpha_bars=_check("Exercise 3 · How much signal is left: ᾱ_t"),
    check_nameless=lambda fn: True)


def synthetic(*sources):
    """A notebook from cell sources: those starting with "#" are Markdown."""
    nb = new_notebook()
    nb.cells = [new_markdown_cell(s) if s.startswith("#") else new_code_cell(s) for s in sources]
    return nb


GOOD = [
    "# 01 · A lesson\n\nObjectives.", "from diffusion_checks import check_linear",
    "## Why noise?", "x = 1",
    "## Exercise 1 · The linear schedule\n\nWrite it.", "def linear(T):\n    return T",
    "check_linear(linear)",
    "## Exercise 2 · `q_sample`: jump straight to step $t$", "def q_sample(x):\n    return x",
    "### What you should see", "print('checking')\ncheck_q_sample(q_sample)",
    "## Exercise 3 · How much signal is left: $ᾱ_t$", "def ab(b):\n    return b",
    "check_alpha_bars(ab)",
    "## Training for real\n\n```python\n## Exercise 9 · inside a fence is no heading\n```",
    "train()",
]


def test_a_well_named_notebook_passes():
    assert exercise_name_problems(synthetic(*GOOD), FAKE_CHECKS) == []


def replaced(old, new):
    cells = [source.replace(old, new) for source in GOOD]
    assert cells != GOOD, f"{old!r} is not in the synthetic notebook"
    return synthetic(*cells)


@pytest.mark.parametrize("nb, problem", [
    (replaced("## Exercise 1 · The linear", "## 1 · The linear"),
     "heading ## '1 · The linear schedule': an exercise heading reads"),
    (replaced("## Exercise 1 · The linear schedule", "## Exercise 1 · The linear one"),
     "check_linear(...) is under `## Exercise 1 · The linear one`, but its check names the "
     "exercise 'Exercise 1 · The linear schedule'"),
    (replaced("## Exercise 3 · How much signal is left: $ᾱ_t$",
              "## Exercise 3 · How much signal is left: $\\bar\\alpha_t$"),
     "but its check names the exercise 'Exercise 3 · How much signal is left: ᾱ_t'"),
    (replaced("## Exercise 2 · `q", "## Exercise 4 · `q"), "exercises are numbered [1, 4, 3]"),
    (replaced("### What you should see", "## What you should see"),
     "check_q_sample(...) is under the heading 'What you should see', not under an "
     "`## Exercise N · ...` heading (it should be `## Exercise 2 · q_sample: jump"),
    (replaced("## Why noise?", "## 2 · Why noise?"), "heading ## '2 · Why noise?'"),
    (replaced("## Training for real", "## Exercise 4 · The linear schedule"),
     "two exercises are both called 'The linear schedule'"),
    (replaced("## Training for real", "## Exercise 4 · Training"),
     "`## Exercise 4 · Training` has no check call under it"),
    (replaced("## Exercise 1 · The", "### Exercise 1 · The"), "heading ### 'Exercise 1 · The"),
    (replaced("## Exercise 1 · The linear schedule", "## Exercise 1: The linear schedule"),
     "heading ## 'Exercise 1: The linear schedule': an exercise heading reads"),
    (replaced("check_linear(linear)", "check_nameless(linear)"),
     "check_nameless(...): diffusion_checks has no such check"),
    (replaced("train()", "check_linear(linear)"), "check_linear(...) is under the heading "
     "'Training for real', not under an `## Exercise N · ...` heading (it should be `## Exer"),
    (synthetic("check_linear(linear)", *GOOD), "check_linear(...) is under no heading, not "),
])
def test_each_naming_mistake_is_named(nb, problem):
    problems = exercise_name_problems(nb, FAKE_CHECKS)
    assert any(problem in p for p in problems), problems


# ── The real notebooks and checks ────────────────────────────────────────────────────


@pytest.mark.parametrize("solution", solution_paths(), ids=lambda p: p.stem)
def test_solution_names_each_exercise_as_its_check_does(solution):
    problems = exercise_name_problems(nbformat.read(solution, as_version=4))
    assert not problems, f"solutions/{solution.name}:\n  " + "\n  ".join(problems)


def test_every_check_has_its_own_exercise_name():
    checks = {name: getattr(diffusion_checks, name) for name in dir(diffusion_checks)
              if name.startswith("check_")}
    assert checks
    nameless = [name for name, check in checks.items()
                if not isinstance(getattr(check, "exercise", None), str)]
    assert not nameless, f"checks without an `.exercise` name: {nameless}"
    malformed = [c.exercise for c in checks.values() if not EXERCISE.match(c.exercise)]
    assert not malformed, f"exercise names not of the form 'Exercise N · <title>': {malformed}"
    by_module = Counter((check.__module__, check.exercise) for check in checks.values())
    shared = [name for (_, name), count in by_module.items() if count > 1]
    assert not shared, f"two checks of one lesson name the same exercise: {shared}"
