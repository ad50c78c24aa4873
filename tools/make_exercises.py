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
    python -m tools.make_exercises --force    # also overwrite changed lessons (backed up)

A lesson in lessons/ may hold a learner's exercises, so it is only overwritten when it is
a generated copy: missing, identical to what the generator makes now, differing from that
only in outputs and metadata (it was run), or an unchanged copy of what the generator made
from an earlier version of the solution. The generator recognises the last by a hash it
stores in the notebook's metadata, ``generated.cells_sha256``: the SHA-256 of every cell's
type and source as generated. Running a notebook leaves types and sources as they are;
editing a cell does not, so a lesson whose cells no longer match its hash holds someone's work.
Such a lesson is left alone (nothing at all is written) unless ``--force`` is given; then
its version is first copied to ``lessons/backups/``. The reset command, which learners use
for a fresh copy of a lesson, decides the same way.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
LESSONS = ROOT / "lessons"

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = "_YOUR ANSWER HERE_"
GENERATED = "generated"  # notebook metadata: {"cells_sha256": hash of the generated cells}
BACKUPS = "backups"  # folder inside lessons/ (not matched by lessons/*.ipynb)


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
    keep[GENERATED] = {"cells_sha256": cells_sha256(cells_of(nb))}
    nb.metadata = nbformat.NotebookNode(keep)
    return nb


def cells_of(nb) -> list[tuple[str, str]]:
    """The (type, source) of every cell: what running a notebook leaves unchanged."""
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def cells_sha256(cells: list[tuple[str, str]]) -> str:
    """The SHA-256 hex digest of a notebook's :func:`cells_of`."""
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read(data: bytes):
    """The notebook in ``data``, or None if it is not a readable notebook."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception:
        return None


def has_work(lesson: Path, blank: bytes) -> bool:
    """Whether ``lesson`` holds someone's work: it is not a generated copy (see the module
    docstring) of ``blank`` (the lesson as generated now) or of an earlier version."""
    if not lesson.exists():
        return False
    data = lesson.read_bytes()
    if data == blank:
        return False
    nb = _read(data)
    if nb is None:
        return True
    cells = cells_of(nb)
    if cells == cells_of(_read(blank)):
        return False  # only outputs or metadata differ: it was run
    stored = nb.metadata.get(GENERATED)
    return not (isinstance(stored, dict) and stored.get("cells_sha256") == cells_sha256(cells))


def backup_path(lesson: Path, now: datetime | None = None) -> Path:
    """A new, unused backup name: ``<lessons>/backups/<name>.<YYYYmmdd-HHMMSS>.ipynb``."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    folder = lesson.parent / BACKUPS
    candidate = folder / f"{lesson.stem}.{stamp}.ipynb"
    number = 2
    while candidate.exists():
        candidate = folder / f"{lesson.stem}.{stamp}-{number}.ipynb"
        number += 1
    return candidate


def save_backup(lesson: Path, now: datetime | None = None) -> Path:
    """Copy ``lesson`` to a new :func:`backup_path` and return that path."""
    backup = backup_path(lesson, now)
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(lesson, backup)
    return backup


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


def solution_paths(prefixes: list[str] | None = None, *,
                   solutions: Path = SOLUTIONS) -> list[Path]:
    """Solution notebooks, sorted, optionally only those whose name starts with a prefix."""
    paths = sorted(solutions.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(pre) for pre in prefixes)]
    return paths


def main(argv: list[str] | None = None, *, solutions: Path = SOLUTIONS,
         lessons: Path = LESSONS) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_exercises", description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson name prefixes, e.g. 01 (default: all)")
    parser.add_argument("--check", action="store_true", help="only report lessons that are out of date")
    parser.add_argument("--force", action="store_true",
                        help=f"also overwrite lessons whose cells were changed (their version is "
                             f"first saved in {lessons.name}/{BACKUPS}/)")
    args = parser.parse_args(argv)
    paths = solution_paths(args.lessons, solutions=solutions)
    if not paths:
        parser.error(f"no solution notebook in {solutions} matches {args.lessons or 'NN_*.ipynb'}")
    plan = [(lessons / path.name, exercise_bytes(path)) for path in paths]
    if args.check:
        return check(plan, lessons)
    refused = [target for target, data in plan if has_work(target, data)]
    if refused and not args.force:
        names = "\n".join(f"  {lessons.name}/{p.name}" for p in refused)
        print(f"make_exercises: refusing to overwrite changed lessons:\n{names}\n"
              "A cell in each differs from every version this command generated, so it may "
              "hold a learner's exercises. Nothing was written. Run again with --force to "
              f"regenerate them anyway (each changed version is first saved in "
              f"{lessons.name}/{BACKUPS}/).", file=sys.stderr)
        return 1
    for target, data in plan:
        shown = f"{lessons.name}/{target.name}"
        if target.exists() and target.read_bytes() == data:
            print(f"up to date  {shown}")
            continue
        if target in refused:
            backup = save_backup(target)
            print(f"saved the changed version to {lessons.name}/{BACKUPS}/{backup.name}")
        lessons.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        print(f"wrote       {shown}")
    return 0


def check(plan: list[tuple[Path, bytes]], lessons: Path) -> int:
    """``--check``: report each lesson as up to date or not; 1 if any is out of date."""
    stale = False
    for target, data in plan:
        fresh = target.exists() and target.read_bytes() == data
        stale = stale or not fresh
        print(f"{'up to date ' if fresh else 'OUT OF DATE'} {lessons.name}/{target.name}")
    if stale:
        print("run `python -m tools.make_exercises` to regenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
