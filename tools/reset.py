"""Restore exercise notebooks in lessons/ to their blank state, keeping a backup of your work.

    python -m tools.reset 01              # lessons whose name starts with 01
    python -m tools.reset 01 03 --force   # also when they hold your work (backed up first)
    python -m tools.reset --all           # every lesson

A lesson is restored without asking when it is missing, already blank, differs from the
blank version only by outputs (you ran it but changed no cell), or is an unchanged copy of
an earlier version of the lesson. When you changed a cell, the reset refuses unless you add
``--force``; then your version is first copied to ``lessons/backups/NN_topic.<date-time>.ipynb``.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from tools.make_exercises import (BACKUPS, LESSONS, SOLUTIONS, exercise_bytes, has_work,
                                  save_backup)


def select(prefixes: list[str], solutions: Path = SOLUTIONS) -> list[Path]:
    """The solution notebooks for the given lesson prefixes (all when ``prefixes`` is empty).

    Raises ``ValueError`` naming the known lessons when a prefix matches none.
    """
    known = sorted(solutions.glob("[0-9][0-9]_*.ipynb"))
    if not prefixes:
        return known
    chosen: list[Path] = []
    for prefix in prefixes:
        name = Path(prefix).name.removesuffix(".ipynb")  # also accept lessons/01_x.ipynb
        matches = [p for p in known if p.stem.startswith(name)]
        if not matches:
            names = ", ".join(p.stem for p in known) or "none"
            raise ValueError(f"no lesson matches {prefix!r}; the lessons are: {names}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def reset(solution_paths: list[Path], *, force: bool = False, lessons: Path = LESSONS,
          now: datetime | None = None) -> tuple[list[str], list[Path]]:
    """Restore the lessons generated from ``solution_paths``.

    Returns (messages, refused): when a lesson holds work and ``force`` is false, nothing
    at all is written and ``refused`` lists those lessons.
    """
    plan = [(lessons / s.name, exercise_bytes(s)) for s in solution_paths]
    refused = [lesson for lesson, blank in plan if has_work(lesson, blank)]
    if refused and not force:
        return [], refused
    messages = []
    for lesson, blank in plan:
        shown = f"{lessons.name}/{lesson.name}"
        if lesson.exists() and lesson.read_bytes() == blank:
            messages.append(f"already blank  {shown}")
            continue
        if lesson in refused:
            backup = save_backup(lesson, now)
            messages.append(f"saved your work to {lessons.name}/{BACKUPS}/{backup.name}")
        lessons.mkdir(parents=True, exist_ok=True)
        lesson.write_bytes(blank)
        messages.append(f"reset          {shown}")
    return messages, []


def main(argv: list[str] | None = None, *, solutions: Path = SOLUTIONS,
         lessons: Path = LESSONS) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.reset", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("lessons", nargs="*", help="lesson name prefixes, e.g. 01")
    parser.add_argument("--all", action="store_true", help="reset every lesson")
    parser.add_argument("--force", action="store_true",
                        help="also reset lessons holding your work (a backup is kept)")
    args = parser.parse_args(argv)
    if bool(args.lessons) == args.all:
        known = ", ".join(p.stem for p in select([], solutions)) or "none"
        print(f"reset: name the lessons to reset (e.g. 01) or use --all; the lessons are: {known}",
              file=sys.stderr)
        return 2
    try:
        chosen = select(args.lessons, solutions)
    except ValueError as err:
        print(f"reset: {err}", file=sys.stderr)
        return 2
    messages, refused = reset(chosen, force=args.force, lessons=lessons)
    if refused:
        names = "\n".join(f"  {lessons.name}/{p.name}" for p in refused)
        print(f"reset: refusing to overwrite your work in:\n{names}\n"
              "Nothing was changed. Run again with --force to reset anyway "
              f"(your version is first saved in {lessons.name}/{BACKUPS}/).", file=sys.stderr)
        return 1
    print("\n".join(messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
