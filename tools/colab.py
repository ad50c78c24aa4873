"""Open the course's notebooks in Google Colab: badges, and the set-up lines that fetch the course.

    python -m tools.colab --check     # exit 1 naming solution notebooks without the set-up lines
    python -m tools.colab --apply     # put / update them in each notebook's first code cell
    python -m tools.colab --badges    # the lesson map's badges, as a Markdown table

Every notebook's first code cell is :data:`SETUP_SNIPPET` alone, titled as the Colab set-up,
so that a learner on their own machine reads the imports in the next cell. On Colab it clones this
repository (once) into /content/diffusion-course, puts it on ``sys.path`` so
``import diffusion_utilities`` works, and moves into its lessons/ folder. Anywhere else it
does nothing and touches no network. After ``--apply``, regenerate the lessons with
``python -m tools.make_exercises``.

A fork changes :data:`REPOSITORY` (and runs ``--apply``) so badges and clones point at it.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import nbformat

from tools.make_exercises import ROOT, SOLUTIONS, solution_paths

REPOSITORY = "diffusion-course/diffusion-course"  # GitHub owner/name: a fork changes this line
BRANCH = "main"
COLAB_DIR = "/content/diffusion-course"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

SETUP_TITLE = "# Colab set-up: on Colab this fetches the course; on your own machine it does nothing"
SETUP_SNIPPET = f"""\
{SETUP_TITLE}
import sys
if "google.colab" in sys.modules:  # on Colab: fetch the course once (elsewhere: nothing)
    import os, subprocess
    if not os.path.isdir("{COLAB_DIR}"):
        subprocess.run(["git", "clone", "--depth", "1",
                        "https://github.com/{REPOSITORY}.git",
                        "{COLAB_DIR}"], check=True)
    sys.path.insert(0, "{COLAB_DIR}")
    os.chdir("{COLAB_DIR}/lessons")
"""
SNIPPET_OPENING = ('import sys\nif "google.colab" in sys.modules:')  # how any version starts


def colab_url(notebook_path: str | Path) -> str:
    """The Colab address that opens ``notebook_path`` (relative to the repository) from GitHub."""
    path = Path(notebook_path)
    if path.is_absolute():
        path = path.resolve().relative_to(ROOT)
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{path.as_posix()}"


def badge(notebook_path: str | Path) -> str:
    """A Markdown "Open in Colab" badge for ``notebook_path``, e.g. ``lessons/01_x.ipynb``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook_path)})"


def badge_table(solutions: list[Path] | None = None) -> str:
    """The lesson map's badges: one row per lesson, exercises and solutions."""
    rows = ["| lesson | exercises | solutions |", "|---|---|---|"]
    for path in solutions if solutions is not None else solution_paths():
        rows.append(f"| {path.stem} | {badge(f'lessons/{path.name}')} | "
                    f"{badge(f'solutions/{path.name}')} |")
    return "\n".join(rows)


def _first_code_cell(nb):
    return next((cell for cell in nb.cells if cell.cell_type == "code"), None)


def has_snippet(nb) -> bool:
    """Whether the first code cell is the current set-up snippet and nothing else."""
    cell = _first_code_cell(nb)
    return cell is not None and cell.source == SETUP_SNIPPET.rstrip("\n")


def split_snippet(source: str) -> tuple[bool, str]:
    """(whether ``source`` starts with any version of the snippet, the code after it)."""
    lines = source.splitlines(keepends=True)
    start = 1 if lines and lines[0].startswith("# Colab set-up") else 0
    if not "".join(lines[start:]).startswith(SNIPPET_OPENING):
        return False, source
    end = start + 2
    while end < len(lines) and (lines[end][:1] in (" ", "\t")):
        end += 1
    return True, "".join(lines[end:]).lstrip("\n")


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nbformat.read(path, as_version=4)


def check(paths: list[Path]) -> list[Path]:
    """The notebooks whose first code cell does not start with :data:`SETUP_SNIPPET`."""
    return [path for path in paths if not has_snippet(_read(path))]


def apply(paths: list[Path]) -> list[Path]:
    """Make each notebook's first code cell the current snippet, alone (code that followed
    an older snippet in the same cell moves to a cell of its own); return those changed."""
    changed = []
    for path in paths:
        nb = _read(path)
        if has_snippet(nb):
            continue
        cell = _first_code_cell(nb)
        found, rest = split_snippet(cell.source) if cell is not None else (False, "")
        snippet_cell = nbformat.v4.new_code_cell(SETUP_SNIPPET.rstrip("\n"))
        snippet_cell["id"] = "colab-setup"
        if cell is None:
            at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
        else:
            at = nb.cells.index(cell)
            if found and rest.strip():
                cell.source = rest.rstrip("\n")   # the imports keep their cell and outputs
            elif found:
                nb.cells.remove(cell)
        nb.cells.insert(at, snippet_cell)
        ending = "\n" if path.read_bytes().endswith(b"\n") else ""
        path.write_text(nbformat.writes(nb, version=4) + ending, encoding="utf-8")
        changed.append(path)
    return changed


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.colab", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="report notebooks without the snippet")
    action.add_argument("--apply", action="store_true", help="insert or update the snippet")
    action.add_argument("--badges", action="store_true", help="print the lesson map's badges")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help=f"notebooks (default: every solution notebook in {SOLUTIONS.name}/)")
    args = parser.parse_args(argv)
    paths = args.notebooks or solution_paths()
    if args.badges:
        print(badge_table(paths))
        return 0
    if args.check:
        missing = check(paths)
        if missing:
            print("these notebooks' first code cell is not the Colab set-up cell "
                  "(run `python -m tools.colab --apply`):", file=sys.stderr)
            print("\n".join(f"  {_shown(p)}" for p in missing), file=sys.stderr)
            return 1
        print(f"every notebook ({len(paths)}) starts with the Colab set-up cell")
        return 0
    changed = apply(paths)
    print("\n".join(f"updated {_shown(p)}" for p in changed) or "nothing to change")
    if changed:
        print("now regenerate the lessons: python -m tools.make_exercises")
    return 0


if __name__ == "__main__":
    sys.exit(main())
