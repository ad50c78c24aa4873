"""The timings command (tools/timings.py) on tiny notebooks, writing to temporary files only."""
import csv

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tools import timings

README = """# The course

Some text.

<!-- timings:start -->
(old table)
<!-- timings:end -->

More text.
"""


def notebook(path, *sources):
    nb = new_notebook()
    nb.cells = [new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def files(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return tmp_path / "timings.csv", readme


def test_times_notebooks_and_writes_csv_and_readme(tmp_path, files, capsys):
    csv_path, readme = files
    ok = notebook(tmp_path / "01_ok.ipynb",
                  "import os\nprint('scale', os.environ['COURSE_SCALE'])", "x = 1")
    bad = notebook(tmp_path / "02_bad.ipynb", "1 / 0")
    # A row from an earlier run on another device is kept.
    timings.write_csv([timings.Timing("01_ok", 99.0, "cuda (some GPU)", "ci", "2024-01-01")],
                      csv_path)
    code = timings.main([str(ok), str(bad), "--scale", "ci", "--write-readme", "--write-outputs",
                         "--csv", str(csv_path), "--readme", str(readme)])
    assert code == 1  # 02_bad raised
    out = capsys.readouterr().out
    assert "02_bad" in out and "ZeroDivisionError" in out

    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["notebook"], r["scale"]) for r in rows] == [("01_ok", "ci"), ("01_ok", "ci")]
    assert list(rows[0]) == list(timings.FIELDS)
    mine = next(r for r in rows if r["device"] == timings.describe_device())
    assert 0 < float(mine["seconds"]) < 60

    text = readme.read_text()
    assert text.startswith("# The course\n\nSome text.\n\n<!-- timings:start -->\n| notebook |")
    assert text.endswith("<!-- timings:end -->\n\nMore text.\n")
    assert "(old table)" not in text and f"| 01_ok | {mine['seconds']} | " in text

    # --write-outputs stored the executed notebook (the kernel saw COURSE_SCALE=ci) ...
    executed = nbformat.read(ok, as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "scale ci\n"
    # ... but not the one that failed.
    assert not nbformat.read(bad, as_version=4).cells[0].outputs


def test_readme_without_markers_is_an_error_before_anything_runs(tmp_path, files, capsys):
    csv_path, readme = files
    readme.write_text("# no markers here\n")
    code = timings.main([str(notebook(tmp_path / "01_ok.ipynb", "x = 1")), "--write-readme",
                         "--csv", str(csv_path), "--readme", str(readme)])
    assert code == 1
    assert "<!-- timings:start -->" in capsys.readouterr().err
    assert not csv_path.exists()


def test_replace_block_keeps_everything_else():
    text = "a\n<!-- timings:start -->\nold\nold\n<!-- timings:end -->\nb\n"
    assert timings.replace_block(text, "| new |") == (
        "a\n<!-- timings:start -->\n| new |\n<!-- timings:end -->\nb\n")
    with pytest.raises(ValueError, match="timings:start"):
        timings.replace_block("<!-- timings:end -->\n<!-- timings:start -->\n", "x")


def test_unknown_lesson_is_an_error(capsys):
    assert timings.main(["99_nope"]) == 1
    assert "no solution notebook matches '99_nope'" in capsys.readouterr().err


def test_device_names_the_hardware():
    device = timings.describe_device()
    assert device.split(" ")[0] in ("cpu", "cuda", "mps") and "(" in device
