"""The reset command (tools/reset.py) restores blank lessons and never loses a learner's work."""
from datetime import datetime

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools import reset
from tools.make_exercises import BEGIN, END, backup_path, exercise_bytes


@pytest.fixture
def course(tmp_path):
    """A course with two solution notebooks and their freshly generated lessons."""
    solutions, lessons = tmp_path / "solutions", tmp_path / "lessons"
    solutions.mkdir()
    lessons.mkdir()
    for name in ("01_first", "02_second"):
        nb = new_notebook()
        nb.cells = [new_markdown_cell(f"# {name}"),
                    new_code_cell(f"def f(x):\n    {BEGIN}\n    return x\n    {END}"),
                    new_code_cell("check_f(f)")]
        nbformat.write(nb, solutions / f"{name}.ipynb")
        (lessons / f"{name}.ipynb").write_bytes(exercise_bytes(solutions / f"{name}.ipynb"))
    return solutions, lessons


def run(course, *argv):
    solutions, lessons = course
    return reset.main(list(argv), solutions=solutions, lessons=lessons)


def fill_in(path, code="def f(x):\n    return x  # my answer"):
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = code
    nbformat.write(nb, path)


def blank(course, name):
    solutions, _ = course
    return exercise_bytes(solutions / f"{name}.ipynb")


def test_refuses_to_overwrite_work(course, capsys):
    _, lessons = course
    fill_in(lessons / "01_first.ipynb")
    (lessons / "02_second.ipynb").unlink()
    before = (lessons / "01_first.ipynb").read_bytes()
    assert run(course, "--all") == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite your work" in err and "lessons/01_first.ipynb" in err
    assert "02_second" not in err
    # Nothing at all was written, not even the missing lesson.
    assert (lessons / "01_first.ipynb").read_bytes() == before
    assert not (lessons / "02_second.ipynb").exists()
    assert not (lessons / reset.BACKUPS).exists()


def test_force_backs_up_then_restores(course, capsys):
    _, lessons = course
    fill_in(lessons / "01_first.ipynb")
    work = (lessons / "01_first.ipynb").read_bytes()
    assert run(course, "01", "--force") == 0
    assert (lessons / "01_first.ipynb").read_bytes() == blank(course, "01_first")
    backups = list((lessons / reset.BACKUPS).glob("*.ipynb"))
    assert [b.read_bytes() for b in backups] == [work]
    assert backups[0].name.startswith("01_first.")
    assert f"saved your work to lessons/backups/{backups[0].name}" in capsys.readouterr().out
    # Backups are not lessons: lessons/*.ipynb still lists exactly the lessons.
    assert sorted(p.name for p in lessons.glob("*.ipynb")) == ["01_first.ipynb", "02_second.ipynb"]


def test_outputs_alone_are_not_work(course):
    _, lessons = course
    path = lessons / "01_first.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="○ NOT ATTEMPTED f\n")]
    nb.cells[2].execution_count = 3
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nbformat.write(nb, path)
    assert run(course, "01") == 0
    assert path.read_bytes() == blank(course, "01_first")
    assert not (lessons / reset.BACKUPS).exists()


def test_missing_and_blank_lessons(course, capsys):
    _, lessons = course
    (lessons / "02_second.ipynb").unlink()
    assert run(course, "--all") == 0
    out = capsys.readouterr().out
    assert "already blank  lessons/01_first.ipynb" in out
    assert "reset          lessons/02_second.ipynb" in out
    assert (lessons / "02_second.ipynb").read_bytes() == blank(course, "02_second")


def test_corrupted_lesson_needs_force(course):
    _, lessons = course
    (lessons / "01_first.ipynb").write_text("<<<<<<< HEAD\n")
    assert run(course, "01") == 1
    assert run(course, "01", "--force") == 0
    assert (lessons / "01_first.ipynb").read_bytes() == blank(course, "01_first")


@pytest.mark.parametrize("argv", [["07"], ["01", "nope"]])
def test_unknown_lesson_lists_the_lessons(course, capsys, argv):
    assert run(course, *argv) == 2
    err = capsys.readouterr().err
    assert "no lesson matches" in err and "01_first, 02_second" in err


def test_needs_lessons_or_all(course, capsys):
    assert run(course) == 2
    assert "--all" in capsys.readouterr().err


def test_backup_names_never_collide(tmp_path):
    lesson = tmp_path / "01_first.ipynb"
    now = datetime(2025, 1, 2, 3, 4, 5)
    first = backup_path(lesson, now)
    first.parent.mkdir()
    first.write_text("{}")
    assert first.name == "01_first.20250102-030405.ipynb"
    assert backup_path(lesson, now).name == "01_first.20250102-030405-2.ipynb"


def test_an_unchanged_copy_of_an_earlier_version_is_not_work(course):
    solutions, lessons = course
    nb = nbformat.read(solutions / "01_first.ipynb", as_version=4)
    nb.cells[0].source = "# 01_first, revised"  # the course changed since the lesson was made
    nbformat.write(nb, solutions / "01_first.ipynb")
    assert run(course, "01") == 0
    assert (lessons / "01_first.ipynb").read_bytes() == blank(course, "01_first")
    assert not (lessons / reset.BACKUPS).exists()
