"""The grader (tools/grade.py) on small synthetic notebooks and on a copy of lesson 01."""
import json
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import diffusion_checks
from diffusion_checks import NOT_ATTEMPTED_MARK, PASSED_MARK
from tools import grade
from tools.make_exercises import BEGIN, END, SOLUTIONS, make_exercise

# ── A toy lesson whose checks use the real check machinery ───────────────────────────

TOY_CHECKS = '''\
from diffusion_checks import call, exercise_check, fail

@exercise_check("Exercise 1 · double: twice x")
def check_double(fn):
    for x in (1, -3, 2.5):
        out = call(fn, x)
        if out is None:
            fail("the result is None — did you forget the `return` statement?")
        if out != 2 * x:
            fail(f"double({x!r}) should be {2 * x!r}, got {out!r}")
    return "matches 2·x on 3 inputs"

@exercise_check("Exercise 2 · square, with ᾱ: x times x")
def check_square(fn):
    for x in (1, -3, 2.5):
        out = call(fn, x)
        if out == 2 * x:
            fail("you doubled x: multiply x by itself instead")
        if out != x * x:
            fail(f"square({x!r}) should be {x * x!r}, got {out!r}")
    return "matches x² on 3 inputs"
'''


def toy_solution(square_body: str = "return x * x"):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [
        new_markdown_cell("# A toy lesson"), new_code_cell(TOY_CHECKS),
        new_markdown_cell("## Exercise 1 · `double`: twice $x$\n\nReturn $2x$."),
        new_code_cell(f"def double(x):\n    {BEGIN}\n    return 2 * x\n    {END}"),
        new_code_cell("check_double(double)"),
        new_markdown_cell("## Exercise 2 · `square`, with ᾱ: $x$ times $x$"),
        new_code_cell(f"def square(x):\n    {BEGIN}\n    {square_body}\n    {END}"),
        new_code_cell("check_square(square)"),
    ]
    return nb


def write(nb, path):
    nbformat.write(nb, path)
    return path


@pytest.fixture(autouse=True)
def plain_output(monkeypatch):
    """No colours or GitHub annotations in what the tests read."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "")  # main() extends it; restored after each test


DOUBLE, SQUARE = "Exercise 1 · double: twice x", "Exercise 2 · square, with ᾱ: x times x"
CELL_NUMBER = re.compile(r"\bcells? \d")  # what the learner reads never counts cells


def by_name(result):
    return {ex.name: ex for ex in result.exercises}


def test_solved_notebook_passes_everything(tmp_path, capsys):
    path = write(toy_solution(), tmp_path / "01_toy.ipynb")
    assert grade.main([str(path), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"✔ passed\s+Exercise 1 · double: twice x\s+matches 2·x on 3 inputs\n", out)
    assert re.search(r"✔ passed\s+Exercise 2 · square, with ᾱ: x times x\s+matches x²", out)
    assert not CELL_NUMBER.search(out)
    assert "01_toy: 2 passed, 0 failed, 0 not attempted" in out
    assert "TOTAL: 2 passed, 0 failed, 0 not attempted in 1 notebook" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["exit_code"] == 0
    assert data["total"] == {"passed": 2, "failed": 0, "not attempted": 0, "not run": 0}
    exercises = data["notebooks"][0]["exercises"]
    assert [(e["name"], e["check"], e["cell"]) for e in exercises] == [
        (DOUBLE, "check_double", 5), (SQUARE, "check_square", 8)]


@pytest.fixture(scope="module")
def blank_result(tmp_path_factory):
    path = write(make_exercise(toy_solution()), tmp_path_factory.mktemp("blank") / "01_toy.ipynb")
    return grade.grade_notebook(path)


def test_blank_notebook_is_not_attempted(blank_result):
    assert [(e.name, e.status) for e in blank_result.exercises] == [
        (DOUBLE, grade.NOT_ATTEMPTED), (SQUARE, grade.NOT_ATTEMPTED)]
    assert not blank_result.problems and blank_result.error is None
    assert grade.summary_line(blank_result) == "01_toy: 0 passed, 0 failed, 2 not attempted"


@pytest.mark.parametrize("flag, code", [([], 0), (["--fail-on-not-attempted"], 1)])
def test_not_attempted_exit_code(blank_result, flag, code, monkeypatch, capsys, tmp_path):
    path = write(make_exercise(toy_solution()), tmp_path / "01_toy.ipynb")
    monkeypatch.setattr(grade, "grade_notebook", lambda *args, **kwargs: blank_result)
    assert grade.main([str(path), *flag]) == code
    out = capsys.readouterr().out
    assert out.count("○ not attempted") == 2
    assert ("--fail-on-not-attempted" in out) == bool(code)


def test_planted_mistake_fails_that_exercise_only(tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    path = write(toy_solution(square_body="return x + x"), tmp_path / "01_toy.ipynb")
    assert grade.main([str(path), "--json", str(tmp_path / "out.json")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"✔ passed\s+Exercise 1 · double: twice x", out)
    # The check's name holds ": " itself; the hint after it is shown whole.
    assert ("✘ FAILED        Exercise 2 · square, with ᾱ: x times x\n"
            "        you doubled x: multiply x by itself instead\n") in out
    assert "01_toy: 1 passed, 1 failed, 0 not attempted" in out
    assert "✘ 1 exercise failed" in out
    assert not CELL_NUMBER.search(out)
    # ":" and "," separate an annotation's properties, so the title escapes them.
    assert (f"::error file={path},title=Exercise 2 · square%2C with ᾱ%3A x times x — failed::"
            "you doubled x: multiply x by itself instead") in out
    assert ("| 01_toy | Exercise 2 · square, with ᾱ: x times x | ✘ FAILED | you doubled x: "
            "multiply x by itself instead |") in summary.read_text()
    failed = json.loads((tmp_path / "out.json").read_text())["notebooks"][0]["exercises"][1]
    assert (failed["name"], failed["status"], failed["detail"]) == (
        SQUARE, "failed", "you doubled x: multiply x by itself instead")


# ── Names and places, read from hand-made outputs (no kernel) ────────────────────────


def stream(text):
    return new_output("stream", name="stdout", text=text)


def error(ename, evalue, traceback=()):
    return new_output("error", ename=ename, evalue=evalue, traceback=list(traceback))


def executed(sources_and_outputs):
    """A notebook as if run: (source, outputs) pairs, "#..." one-liners are Markdown."""
    nb = new_notebook()
    nb.cells = make_cells([source for source, _ in sources_and_outputs])
    count = 0
    for cell, (_, outputs) in zip(nb.cells, sources_and_outputs):
        if cell.cell_type == "code":
            count += 1
            cell.execution_count, cell.outputs = count, list(outputs)
    run = grade.Execution(executed={i for i, c in enumerate(nb.cells) if c.cell_type == "code"})
    return grade.read_results(nb, run, "05_names.ipynb")


def test_headings_and_the_sections_they_open():
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell("# 05 · Title"), new_code_cell("a = 1"),
        new_markdown_cell("## Exercise 1 · `f`: from $x_t$ to $x_{t-1}$ ##\n\n```python\n"
                          "# not a heading\n```\n### What you should see"),
        new_code_cell("check_f(f)"),
        new_markdown_cell("## Training for real"), new_code_cell("train()"),
        new_markdown_cell("  ## Exercise 2 · g\n\nText.\n\n~~~\n## inside a fence\n~~~"),
        new_code_cell("g = 2")]
    assert grade.markdown_headings(nb.cells[2].source) == [
        (2, "Exercise 1 · f: from x_t to x_{t-1}"), (3, "What you should see")]
    assert [(s.exercise, s.heading) for s in grade.cell_sections(nb)][1::2] == [
        ("", "05 · Title"), ("Exercise 1 · f: from x_t to x_{t-1}", "What you should see"),
        ("", "Training for real"), ("Exercise 2 · g", "Exercise 2 · g")]


def test_course_check_names_are_read_whole():
    """The course's exercise names hold spaces, "·", ":" and "ᾱ"; each is read whole, from
    the section heading or, outside one, from the name the check gives itself."""
    alpha_bars = diffusion_checks.check_alpha_bars.exercise  # "Exercise 4 · ...: ᾱ_t"
    q_sample = diffusion_checks.check_q_sample.exercise  # "Exercise 5 · q_sample: jump ..."
    assert "ᾱ" in alpha_bars and ":" in alpha_bars and ":" in q_sample
    result = executed([
        ("## Exercise 4 · How much signal is left: $ᾱ_t$", []),
        ("check_alpha_bars(alpha_bars_from_betas)",
         [stream(f"{PASSED_MARK} {alpha_bars}: matches the reference on 2 schedules\n")]),
        ("## Exercise 5 · `q_sample`: jump straight to step t", []),
        ("check_q_sample(q_sample)",
         [error("AssertionError", f"{q_sample}: the noise term needs sqrt(1 - ᾱ_t): add it")]),
        ("## Trying it again, outside the exercise", []),
        ("check_q_sample(q_sample)",
         [stream(f"{NOT_ATTEMPTED_MARK} {q_sample}: not attempted yet — replace it\n")]),
        ("check_alpha_bars(alpha_bars_from_betas)",
         [error("AssertionError", f"{alpha_bars}: ᾱ_t is the product: use torch.cumprod")]),
    ])
    assert [(e.name, e.status, e.detail) for e in result.exercises] == [
        (alpha_bars, grade.PASSED, "matches the reference on 2 schedules"),
        (q_sample, grade.FAILED, "the noise term needs sqrt(1 - ᾱ_t): add it"),
        (q_sample, grade.NOT_ATTEMPTED, "not attempted yet — replace it"),
        (alpha_bars, grade.FAILED, "ᾱ_t is the product: use torch.cumprod")]


def test_the_heading_names_the_exercise_even_when_the_check_says_otherwise():
    result = executed([
        ("## Exercise 1 · `double`, the heading", []),
        ("check_double(double)", [stream(f"{PASSED_MARK} double: matches 2·x\n")]),
        ("## Exercise 2 · square", []),
        ("check_square(square)", [error("AssertionError", "square: you doubled x: multiply")]),
    ])
    assert [(e.name, e.detail) for e in result.exercises] == [
        ("Exercise 1 · double, the heading", "matches 2·x"),
        ("Exercise 2 · square", "you doubled x: multiply")]


def test_an_error_outside_a_check_is_placed_by_heading_and_first_line():
    result = executed([
        ("# 05 · Names", []),
        ("import math", []),
        ("## Exercise 2 · The cosine schedule", []),
        ("# Your turn.\ndef cosine_beta_schedule(T: int, s: float = 0.008):\n    return (",
         [error("SyntaxError", "'(' was never closed (2811046104.py, line 3)")]),
        ("check_cosine_beta_schedule(cosine_beta_schedule)",
         [error("NameError", "name 'cosine_beta_schedule' is not defined")]),
        ("## Comparing the schedules", []),
        ("plot(schedules)",
         [error("KeyError", "'cosine'", ["Cell In[2], line 1", "Cell In[4], line 1"])]),
    ])
    cosine = result.exercises[0]
    assert cosine.name == "Exercise 2 · The cosine schedule"
    assert cosine.detail == (
        "NameError: name 'cosine_beta_schedule' is not defined\n(an error above, under "
        "“Exercise 2 · The cosine schedule”, in the cell starting `def cosine_beta_schedule(T: "
        "int, s: float = 0.008):`, may be the cause: SyntaxError: '(' was never closed (line 3)"
        " — fix that first)")
    assert [(p.place, p.message) for p in result.problems] == [
        ("under “Exercise 2 · The cosine schedule”, in the cell starting "
         "`def cosine_beta_schedule(T: int, s: float = 0.008):`",
         "SyntaxError: '(' was never closed (line 3)"),
        ("under “Comparing the schedules”, in the cell starting `plot(schedules)`",
         "KeyError: 'cosine'")]
    report = grade.report(result, grade._Style(None))
    assert "    Under “Comparing the schedules”, in the cell starting `plot(schedules)`:" in report
    assert not CELL_NUMBER.search(report)
    data = grade.to_json([result], 1)["notebooks"][0]  # tools still get the cell numbers
    assert [(p["cell"], p["section"]) for p in data["problems"]] == [
        (4, "Exercise 2 · The cosine schedule"), (7, "Comparing the schedules")]


# ── Hostile notebooks: endless loops, floods of output, broken code ──────────────────
# Their checks print the same marks as diffusion_checks, without importing torch (fast).

LIGHT_CHECKS = f'''\
PASSED, NOT_ATTEMPTED = {PASSED_MARK!r}, {NOT_ATTEMPTED_MARK!r}

def check(name, fn, x, want):
    try:
        out = fn(x)
    except NotImplementedError:
        print(NOT_ATTEMPTED, name + ": not attempted yet")
        return False
    if out != want:
        raise AssertionError(f"{{name}}: {{name}}({{x}}) should be {{want}}, got {{out}}")
    print(PASSED, name + ": ok")
    return True

def check_loop(fn): return check("Exercise 1 · loop: never ends", fn, 1, 1)
def check_chatty(fn): return check("Exercise 2 · chatty: prints a lot", fn, 2, 4)
def check_typo(fn): return check("Exercise 3 · typo, a SyntaxError", fn, 1, 2)
def check_wrong_type(fn): return check("Exercise 4 · wrong_type", fn, 1, 2)
def check_one(fn): return check("one", fn, 1, 1)
def check_two(fn): return check("two", fn, 1, 2)
def check_three(fn): return check("three", fn, 1, 3)

def check_plain(fn):
    assert fn(1) == 2, "a message without an exercise name"
'''

HOSTILE_CELLS = [  # "## ..." strings are Markdown cells
    "# A hostile lesson",
    LIGHT_CHECKS,
    "## Exercise 1 · `loop`: never ends",
    "def loop(x):\n    while True:\n        pass",
    "check_loop(loop)",
    "## Exercise 2 · `chatty`: prints a lot",
    "print('z' * 3_000_000)",
    "def chatty(x):\n    for i in range(40_000):\n        print('chatter', i)\n    return x * x",
    "check_chatty(chatty)",
    "## Exercise 3 · `typo`, a SyntaxError",
    "# The learner's code:\ndef typo(x):\n    return 2 * x +",
    "check_typo(typo)",
    "## Exercise 4 · `wrong_type`",
    "def wrong_type(x):\n    return x + 'a'",
    "### What you should see",
    "check_wrong_type(wrong_type)",
    "## Checks outside any exercise",
    "check_plain(lambda x: 3)",
    "check_one(lambda x: 1)\ncheck_two(lambda x: 5)\ncheck_three(lambda x: 3)",
]
LOOP, CHATTY, TYPO, WRONG_TYPE = (
    "Exercise 1 · loop: never ends", "Exercise 2 · chatty: prints a lot",
    "Exercise 3 · typo, a SyntaxError", "Exercise 4 · wrong_type")


def make_cells(sources):
    return [new_markdown_cell(source) if source.startswith("#") and "\n" not in source
            else new_code_cell(source) for source in sources]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    nb = new_notebook()
    nb.cells = make_cells(HOSTILE_CELLS)
    path = write(nb, folder / "02_hostile.ipynb")
    result = grade.grade_notebook(path, cell_timeout=4)
    return path, result


def test_endless_loop_is_interrupted_and_grading_goes_on(hostile):
    _, result = hostile
    loop = by_name(result)[LOOP]
    assert loop.status == grade.FAILED
    assert "ran longer than the time limit (4 s)" in loop.detail
    assert re.search(r"\(raised under “Exercise 1 · loop: never ends”, in the cell starting "
                     r"`def loop\(x\):`, line [23], in loop\)", loop.detail)
    assert by_name(result)[CHATTY].status == grade.PASSED  # later cells still ran
    assert result.error is None


def test_flood_of_output_is_cut(hostile, tmp_path, capsys, monkeypatch):
    path, result = hostile
    # The check's pass line came after 40 000 printed lines: still found.
    assert by_name(result)[CHATTY].status == grade.PASSED
    monkeypatch.setattr(grade, "grade_notebook", lambda *args, **kwargs: result)
    assert grade.main([str(path), "--json", str(tmp_path / "out.json")]) == 1
    assert len(capsys.readouterr().out) < 5_000
    assert (tmp_path / "out.json").stat().st_size < 10_000


def test_broken_code_counts_as_failed_with_the_error(hostile):
    _, result = hostile
    typo, wrong = by_name(result)[TYPO], by_name(result)[WRONG_TYPE]
    assert typo.status == wrong.status == grade.FAILED
    assert typo.detail.startswith("NameError: name 'typo' is not defined")
    assert ("(an error above, under “Exercise 3 · typo, a SyntaxError”, in the cell starting "
            "`def typo(x):`, may be the cause: SyntaxError: invalid syntax (line 3) — fix that "
            "first)") in typo.detail
    assert wrong.detail.startswith("TypeError: ")
    assert ("(raised under “Exercise 4 · wrong_type”, in the cell starting `def wrong_type(x):`, "
            "line 2, in wrong_type)") in wrong.detail
    assert [(p.section, p.where, p.message.split(":")[0], p.cell) for p in result.problems] == [
        (TYPO, "def typo(x):", "SyntaxError", 11)]  # the cell number is kept for tools only
    report = grade.report(result, grade._Style(None))
    assert ("    Under “Exercise 3 · typo, a SyntaxError”, in the cell starting `def typo(x):`:\n"
            "        SyntaxError: invalid syntax (line 3)") in report
    assert not CELL_NUMBER.search(report)


def test_exercises_are_named_by_their_headings(hostile):
    _, result = hostile
    assert [e.name for e in result.exercises[:4]] == [LOOP, CHATTY, TYPO, WRONG_TYPE]
    assert [e.check for e in result.exercises[:4]] == [
        "check_loop", "check_chatty", "check_typo", "check_wrong_type"]
    assert by_name(result)[CHATTY].detail == "ok"  # the printed name is not part of the detail


def test_exercise_names_fall_back_to_the_check_call(hostile):
    _, result = hostile  # outside an "Exercise" section: what the check printed, or its name
    plain = by_name(result)["plain"]
    assert (plain.status, plain.detail) == (grade.FAILED, "AssertionError: a message without "
                                                          "an exercise name")
    # One cell, three checks: the second fails, so the third never runs.
    assert [(e.name, e.status) for e in result.exercises[-3:]] == [
        ("one", grade.PASSED), ("two", grade.FAILED), ("three", grade.NOT_RUN)]
    assert grade.exit_code([result]) == 1


def test_github_annotations_and_job_summary(hostile, tmp_path, monkeypatch, capsys):
    path, result = hostile
    summary = tmp_path / "summary.md"
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setattr(grade, "grade_notebook", lambda *args, **kwargs: result)
    assert grade.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b[1;31m✘ FAILED" in out  # coloured in the Actions log
    annotations = [line for line in out.splitlines() if line.startswith("::error ")]
    assert len(annotations) == 6  # loop, typo, wrong_type, plain, two, three
    assert any("title=Exercise 3 · typo%2C a SyntaxError — failed::NameError" in a
               for a in annotations)
    assert not any(CELL_NUMBER.search(a) for a in annotations)
    table = summary.read_text()
    assert table.startswith("## Exercise grades")
    assert "| 02_hostile | Exercise 2 · chatty: prints a lot | ✔ passed |  |" in table
    assert "| 02_hostile | Exercise 4 · wrong\\_type | ✘ FAILED | TypeError: " in table
    assert not CELL_NUMBER.search(table)


def test_plant_mistake_falls_back_to_the_last_exercise():
    nb = toy_solution()
    assert plant_mistake(nb) == (8, "ValueError: a planted mistake")
    assert nb.cells[6].source == "def square(x):\n    raise ValueError('a planted mistake')"


@pytest.mark.parametrize("cells, kwargs, message", [
    (["import time\ntime.sleep(60)", "check_late(1)"], {"timeout": 3},
     "the notebook time limit was reached"),
    (["import os\nos._exit(3)", "check_late(1)"], {}, "the Python kernel died"),
])
def test_notebook_that_cannot_finish(tmp_path, cells, kwargs, message):
    nb = new_notebook()
    nb.cells = [new_code_cell(source) for source in cells]
    result = grade.grade_notebook(write(nb, tmp_path / "03_x.ipynb"), **kwargs)
    assert result.error.startswith(message)
    assert [(e.name, e.status) for e in result.exercises] == [("late", grade.NOT_RUN)]
    assert grade.exit_code([result]) == 1
    assert "stopped early" in grade.summary_line(result)


def test_unreadable_notebook_is_reported(tmp_path):
    path = tmp_path / "04_conflict.ipynb"
    path.write_text("<<<<<<< HEAD\n{}\n=======\n")
    result = grade.grade_notebook(path)
    assert result.error.startswith("could not read the notebook")
    assert grade.exit_code([result]) == 1


def test_unknown_lesson_is_a_clear_error(capsys):
    assert grade.main(["99_no_such_lesson"]) == 2
    assert "no notebook or lesson matches '99_no_such_lesson'" in capsys.readouterr().err


def test_shorten_cuts_lines_and_characters():
    text = "\n".join(f"line {i} " + "x" * 1000 for i in range(20))
    short = grade.shorten(text, lines=3, chars=200)
    assert len(short) < 260 and short.endswith("(17 more lines)")


# ── The real lesson 01, once it exists: one planted mistake ──────────────────────────

LESSON_01 = SOLUTIONS / "01_forward_process.ipynb"
MISSING_SQRT = ("(1 - alpha_bar_t).sqrt() * eps", "(1 - alpha_bar_t) * eps")  # in q_sample


def plant_mistake(nb) -> tuple[int, str]:
    """Break one exercise of a solution notebook: q_sample's square root when the solution
    reads as expected, else the last coded exercise. Return (its check cell number, a
    piece of the hint the grader must show)."""
    coded = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and BEGIN in c.source]
    index = next((i for i in coded if MISSING_SQRT[0] in nb.cells[i].source), None)
    if index is not None:
        nb.cells[index].source = nb.cells[index].source.replace(*MISSING_SQRT)
        hint = "sqrt(1 - ᾱ_t)"
    else:
        index, hint = coded[-1], "ValueError: a planted mistake"
        out, inside = [], False
        for line in nb.cells[index].source.splitlines():
            if line.strip() == BEGIN:
                inside = True
                indent = line[: len(line) - len(line.lstrip())]
                out.append(indent + "raise ValueError('a planted mistake')")
            elif line.strip() == END:
                inside = False
            elif not inside:
                out.append(line)
        nb.cells[index].source = "\n".join(out)
    check = next(i for i in range(index, len(nb.cells))
                 if nb.cells[i].cell_type == "code" and grade.CHECK_CALL.search(nb.cells[i].source))
    return check + 1, hint


@pytest.mark.skipif(not LESSON_01.exists(), reason="lesson 01 is not written yet")
def test_real_lesson_with_one_planted_mistake(tmp_path):
    nb = nbformat.read(LESSON_01, as_version=4)
    cell, hint = plant_mistake(nb)
    result = grade.grade_notebook(write(nb, tmp_path / LESSON_01.name))
    report = grade.report(result, grade._Style(None))
    wrong = [e for e in result.exercises if e.status != grade.PASSED]
    assert [(e.cell, e.status) for e in wrong] == [(cell, grade.FAILED)], report
    assert hint in wrong[0].detail and hint in report
    sections = grade.cell_sections(nb)
    assert [e.name for e in result.exercises] == [
        sections[e.cell - 1].exercise or e.name for e in result.exercises]
    assert f"✘ FAILED        {wrong[0].name}\n" in report and not CELL_NUMBER.search(report)
    assert result.error is None and len(result.exercises) >= 3
    assert grade.exit_code([result]) == 1
