"""Generate the exercise notebooks in lessons/ from the solution notebooks in solutions/.

In a solution notebook, learner code is marked (nbgrader's convention) by

    ### BEGIN SOLUTION
    ...the solution...
    ### END SOLUTION

inside a code cell. Each marked region becomes, at the marker's indentation,

    # YOUR CODE HERE
    raise NotImplementedError()

In a markdown cell the region becomes "_YOUR ANSWER HERE_". All outputs and execution
counts are cleared and per-cell metadata other than tags is dropped, so running the
generator twice gives identical bytes.

    python -m tools.make_exercises            # regenerate every lesson
    python -m tools.make_exercises 01         # only lessons whose name starts with 01
    python -m tools.make_exercises --check    # exit 1 if lessons/ is out of date

This overwrites lessons/: it is the maintainers' tool. A learner who wants a fresh copy
of a lesson uses the reset command instead, which protects their work.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
LESSONS = ROOT / "lessons"

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = "_YOUR ANSWER HERE_"


class MarkerError(ValueError):
    """A solution notebook's markers are unbalanced or nested."""


def strip_solutions(source: str, *, cell_type: str = "code", where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region of one cell's source by the stub."""
    out: list[str] = []
    inside_since = None  # line number of the open BEGIN marker
    for number, line in enumerate(source.splitlines(), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside_since is not None:
                raise MarkerError(f"{where}, line {number}: nested '{BEGIN}' "
                                  f"(the region opened on line {inside_since} is not closed)")
            inside_since = number
            indent = line[: len(line) - len(line.lstrip())]
            if cell_type == "code":
                out.extend(indent + stub for stub in CODE_STUB)
            else:
                out.append(indent + MARKDOWN_STUB)
        elif marker == END:
            if inside_since is None:
                raise MarkerError(f"{where}, line {number}: '{END}' without a '{BEGIN}' before it")
            inside_since = None
        elif inside_since is None:
            out.append(line)
    if inside_since is not None:
        raise MarkerError(f"{where}, line {inside_since}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def make_exercise(solution) -> nbformat.NotebookNode:
    """The exercise version of a solution notebook (a new notebook; the input is untouched)."""
    nb = copy.deepcopy(solution)
    for index, cell in enumerate(nb.cells):
        where = f"cell {index}"
        cell.source = strip_solutions(cell.source, cell_type=cell.cell_type, where=where)
        tags = cell.get("metadata", {}).get("tags")
        cell.metadata = nbformat.NotebookNode({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    keep = {k: nb.metadata[k] for k in ("kernelspec", "language_info") if k in nb.metadata}
    if "language_info" in keep:
        keep["language_info"] = {"name": keep["language_info"].get("name", "python")}
    nb.metadata = nbformat.NotebookNode(keep)
    return nb


def exercise_bytes(solution_path: Path) -> bytes:
    """The exact bytes of the exercise notebook generated from ``solution_path``."""
    solution = nbformat.read(solution_path, as_version=4)
    try:
        exercise = make_exercise(solution)
    except MarkerError as err:
        raise MarkerError(f"{solution_path.name}: {err}") from None
    if not any(BEGIN in cell.source for cell in solution.cells):
        raise MarkerError(f"{solution_path.name}: no '{BEGIN}' region, so the lesson has no exercise")
    return (nbformat.writes(exercise, version=4) + "\n").encode("utf-8")


def solution_paths(prefixes: list[str] | None = None) -> list[Path]:
    """Solution notebooks, sorted, optionally only those whose name starts with a prefix."""
    paths = sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(pre) for pre in prefixes)]
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson name prefixes, e.g. 01 (default: all)")
    parser.add_argument("--check", action="store_true", help="only report lessons that are out of date")
    args = parser.parse_args(argv)
    paths = solution_paths(args.lessons)
    if not paths:
        parser.error(f"no solution notebook in {SOLUTIONS} matches {args.lessons or 'NN_*.ipynb'}")
    stale = []
    for path in paths:
        target = LESSONS / path.name
        data = exercise_bytes(path)
        if target.exists() and target.read_bytes() == data:
            print(f"up to date  lessons/{path.name}")
        elif args.check:
            stale.append(path.name)
            print(f"OUT OF DATE lessons/{path.name}")
        else:
            LESSONS.mkdir(exist_ok=True)
            target.write_bytes(data)
            print(f"wrote       lessons/{path.name}")
    if stale:
        print("run `python -m tools.make_exercises` to regenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
