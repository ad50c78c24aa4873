"""Time every solution notebook: how long each takes top to bottom in a fresh kernel, here.

    python -m tools.timings                           # all, at COURSE_SCALE (default standard)
    python -m tools.timings --scale ci 01 02          # some lessons, at another scale
    python -m tools.timings --scale standard --write-readme
    python -m tools.timings --write-outputs           # also save the executed notebooks

Writes ``timings.csv`` (notebook, seconds, device, scale, date), replacing the rows of the
same notebook, scale and device and keeping the others. With ``--write-readme`` the same
table goes into README.md between the lines ``<!-- timings:start -->`` and
``<!-- timings:end -->``. With ``--write-outputs`` each executed notebook, outputs included,
is written back to solutions/ (that is how the solution notebooks get their outputs).
A notebook that raises an error is reported and neither timed nor written; the exit status
is then 1.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import nbformat

from tools.grade import _errors, execute
from tools.make_exercises import ROOT, SOLUTIONS

FIELDS = ("notebook", "seconds", "device", "scale", "date")
SCALES = ("ci", "standard", "full")
START, END = "<!-- timings:start -->", "<!-- timings:end -->"


@dataclass
class Timing:
    notebook: str
    seconds: float
    device: str
    scale: str
    date: str

    def key(self):
        return (self.notebook, self.scale, self.device)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device() -> str:
    """What the notebooks run on: ``du.get_device()`` and the GPU's or CPU's name."""
    import torch

    import diffusion_utilities as du

    device = du.get_device()
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return f"mps ({platform.machine()} Apple GPU)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device.type} ({_cpu_name()}, {cores} cores)"


def time_notebook(path: Path, *, scale: str, cell_timeout: float = 3600,
                  write_outputs: bool = False) -> tuple[float, list[str]]:
    """Run ``path`` at ``scale``; return (wall seconds, error messages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "COURSE_SCALE": scale}
    env.pop("MPLBACKEND", None)  # figures render inline, as a learner sees them
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    run = execute(nb, path.parent, cell_timeout=cell_timeout, timeout=float("inf"), env=env)
    errors = [f"cell {i + 1}: {e.get('ename')}: {e.get('evalue')}"
              for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              and "raises-exception" not in cell.get("metadata", {}).get("tags", [])
              for e in _errors(cell)[:1]]
    errors += [f"cell {i + 1}: interrupted after {cell_timeout:g} s" for i in sorted(run.timed_out)]
    if run.stopped:
        errors.append(run.stopped)
    if write_outputs and not errors:
        nbformat.write(nb, path)
    return run.seconds, errors


def read_csv(path: Path) -> list[Timing]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [Timing(r["notebook"], float(r["seconds"]), r["device"], r["scale"], r["date"])
                for r in csv.DictReader(f)]


def merge(old: list[Timing], new: list[Timing]) -> list[Timing]:
    """``old`` with the rows of ``new`` replacing those of the same notebook, scale, device."""
    rows = {t.key(): t for t in old}
    rows.update({t.key(): t for t in new})
    order = {scale: i for i, scale in enumerate(SCALES)}
    return sorted(rows.values(), key=lambda t: (t.notebook, order.get(t.scale, 9), t.device))


def write_csv(rows: list[Timing], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FIELDS)
        for t in rows:
            writer.writerow([t.notebook, f"{t.seconds:.1f}", t.device, t.scale, t.date])


def markdown_table(rows: list[Timing]) -> str:
    lines = ["| notebook | seconds | device | scale | date |", "|---|---:|---|---|---|"]
    lines += [f"| {t.notebook} | {t.seconds:.1f} | {t.device} | {t.scale} | {t.date} |"
              for t in rows]
    return "\n".join(lines)


def check_markers(text: str, where: str = "README.md") -> None:
    """Raise ``ValueError`` unless ``text`` has the start marker line, then the end one."""
    lines = [line.strip() for line in text.splitlines()]
    if START not in lines or END not in lines or lines.index(START) > lines.index(END):
        raise ValueError(f"{where} needs the lines {START} and {END} (in that order) around "
                         "the place for the timings table")


def replace_block(text: str, table: str) -> str:
    """``text`` with what lies between the marker lines replaced by ``table``."""
    check_markers(text)
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == START)
    end = next(i for i, line in enumerate(lines) if line.strip() == END and i > start)
    return "".join(lines[: start + 1]) + table + "\n" + "".join(lines[end:])


def update_readme(readme: Path, rows: list[Timing]) -> None:
    readme.write_text(replace_block(readme.read_text(encoding="utf-8"), markdown_table(rows)),
                      encoding="utf-8")


def notebooks(targets: list[str], solutions: Path = SOLUTIONS) -> list[Path]:
    known = sorted(solutions.glob("[0-9][0-9]_*.ipynb"))
    if not targets:
        return known
    paths = []
    for target in targets:
        if Path(target).is_file():
            paths.append(Path(target))
            continue
        matches = [p for p in known if p.name.startswith(target)]
        if not matches:
            names = ", ".join(p.stem for p in known) or "none"
            raise ValueError(f"no solution notebook matches {target!r}; they are: {names}")
        paths.extend(matches)
    return list(dict.fromkeys(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.timings", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("notebooks", nargs="*",
                        help="lesson prefixes or notebook paths (default: every solution notebook)")
    parser.add_argument("--scale", choices=SCALES,
                        default=os.environ.get("COURSE_SCALE", "standard").strip().lower(),
                        help="run size (default: $COURSE_SCALE, else standard)")
    parser.add_argument("--write-readme", action="store_true",
                        help="also put the table into README.md between the timings markers")
    parser.add_argument("--write-outputs", action="store_true",
                        help="save each executed notebook (with its outputs) back in place")
    parser.add_argument("--cell-timeout", type=float, default=3600, metavar="S",
                        help="interrupt a cell after S seconds (default: 3600)")
    parser.add_argument("--csv", type=Path, default=ROOT / "timings.csv", help=argparse.SUPPRESS)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        paths = notebooks(args.notebooks)
        if args.write_readme:
            check_markers(args.readme.read_text(encoding="utf-8") if args.readme.exists() else "",
                          str(args.readme))
    except ValueError as err:
        print(f"timings: {err}", file=sys.stderr)
        return 1
    if not paths:
        print("timings: no solution notebooks found", file=sys.stderr)
        return 1

    device, today = describe_device(), date.today().isoformat()
    print(f"Timing {len(paths)} notebook(s) at COURSE_SCALE={args.scale} on {device}", flush=True)
    new, failed = [], []
    for path in paths:
        seconds, errors = time_notebook(path, scale=args.scale, cell_timeout=args.cell_timeout,
                                        write_outputs=args.write_outputs)
        if errors:
            failed.append(path.stem)
            print(f"  {path.stem:<32} ERROR after {seconds:.1f} s (not recorded):")
            print("\n".join(f"      {line[:300]}" for line in errors[:5]))
            continue
        new.append(Timing(path.stem, seconds, device, args.scale, today))
        saved = "  (outputs saved)" if args.write_outputs else ""
        print(f"  {path.stem:<32} {seconds:8.1f} s{saved}", flush=True)

    rows = merge(read_csv(args.csv), new)
    write_csv(rows, args.csv)
    print(f"wrote {args.csv}")
    if args.write_readme:
        update_readme(args.readme, rows)
        print(f"updated the timings table in {args.readme}")
    if failed:
        print(f"timings: {len(failed)} notebook(s) raised errors: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
