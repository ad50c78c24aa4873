"""Colab support (tools/colab.py): badges, the set-up snippet, --check and --apply on copies."""
import os
import subprocess
import sys
import types

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools import colab


def test_badge_links_the_notebook_on_github():
    url = ("https://colab.research.google.com/github/" + colab.REPOSITORY
           + "/blob/main/lessons/01_forward_process.ipynb")
    assert colab.colab_url("lessons/01_forward_process.ipynb") == url
    assert colab.badge("lessons/01_forward_process.ipynb") == (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})")
    assert colab.colab_url(colab.ROOT / "solutions" / "02_unet.ipynb").endswith(
        "/blob/main/solutions/02_unet.ipynb")


def test_snippet_does_nothing_outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    cwd, path = os.getcwd(), list(sys.path)
    exec(colab.SETUP_SNIPPET, {})
    assert os.getcwd() == cwd and sys.path == path


def test_snippet_on_colab_clones_once_and_moves_in(monkeypatch):
    calls, moves = [], []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", moves.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    exec(colab.SETUP_SNIPPET, {})
    assert calls == [["git", "clone", "--depth", "1",
                      f"https://github.com/{colab.REPOSITORY}.git", "/content/diffusion-course"]]
    assert moves == ["/content/diffusion-course/lessons"]
    assert sys.path[0] == "/content/diffusion-course"
    monkeypatch.setattr(os.path, "isdir", lambda p: True)  # a second run: no new clone
    exec(colab.SETUP_SNIPPET, {})
    assert len(calls) == 1


def solution(path, setup="import torch\nimport diffusion_utilities as du"):
    nb = new_notebook()
    cell = new_code_cell(setup, outputs=[new_output("stream", name="stdout", text="cpu\n")])
    nb.cells = [new_markdown_cell("# Lesson"), cell, new_code_cell("x = 1")]
    nbformat.write(nb, path)
    return path


def test_check_and_apply_on_copies(tmp_path, capsys):
    good = solution(tmp_path / "01_a.ipynb", colab.SETUP_SNIPPET.rstrip("\n"))
    bad = solution(tmp_path / "02_b.ipynb")
    assert colab.main(["--check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "02_b.ipynb" in err and "01_a.ipynb" not in err

    assert colab.main(["--apply", str(good), str(bad)]) == 0
    assert "updated" in capsys.readouterr().out
    assert colab.main(["--check", str(good), str(bad)]) == 0
    nb = nbformat.read(bad, as_version=4)
    # the set-up has a cell of its own, titled; the imports follow with their outputs
    assert nb.cells[1].source == colab.SETUP_SNIPPET.rstrip("\n")
    assert nb.cells[1].source.startswith("# Colab set-up")
    assert nb.cells[2].source == "import torch\nimport diffusion_utilities as du"
    assert nb.cells[2].outputs[0]["text"] == "cpu\n"  # outputs kept
    before = bad.read_bytes()
    assert colab.apply([good, bad]) == []  # applying again changes nothing
    assert bad.read_bytes() == before


@pytest.mark.parametrize("title", ["", colab.SETUP_TITLE + "\n"])
def test_apply_splits_an_older_snippet_off_the_imports(tmp_path, title):
    old = title + colab.SETUP_SNIPPET.split("\n", 1)[1].replace(colab.REPOSITORY,
                                                                 "someone/old-name")
    path = solution(tmp_path / "01_a.ipynb", old + "\nimport torch")
    assert colab.check([path]) == [path]
    colab.apply([path])
    cells = nbformat.read(path, as_version=4).cells
    assert cells[1].source == colab.SETUP_SNIPPET.rstrip("\n")
    assert cells[2].source == "import torch"
    assert sum(c.source.count("google.colab") for c in cells) == 1


def test_badge_table_lists_every_lesson(tmp_path):
    table = colab.badge_table([tmp_path / "01_a.ipynb", tmp_path / "02_b.ipynb"])
    assert table.count("colab-badge.svg") == 4
    assert "/blob/main/lessons/02_b.ipynb" in table and "/blob/main/solutions/01_a.ipynb" in table
