"""Grade filled-in exercise notebooks: run each one in a fresh kernel, report every exercise.

    python -m tools.grade                      # every notebook in lessons/
    python -m tools.grade 01 03                # lessons whose name starts with 01 or 03
    python -m tools.grade path/to/my.ipynb     # any notebook
    python -m tools.grade --fail-on-not-attempted --json results.json

Each notebook runs top to bottom in a new kernel of this Python, as "Restart & Run All" would,
and keeps going after errors so that every exercise gets checked. A cell that runs longer than
``--cell-timeout`` seconds is interrupted (an endless loop, say) and the next cell runs; a
notebook that runs longer than ``--timeout`` seconds in all is stopped. Printed output is capped
so a cell printing megabytes cannot flood the report.

Each exercise is reported as passed, FAILED (with the check's hint), not attempted (still the
``raise NotImplementedError()`` stub) or not run (the notebook stopped before its check). The
exit status is 1 when an attempted exercise fails or a notebook could not run to the end (and,
with ``--fail-on-not-attempted``, when an exercise is not attempted), 2 when no notebook
matches what was asked, else 0.

Notebooks run at ``COURSE_SCALE=ci`` (the smallest run size) unless the variable is set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from nbclient.exceptions import DeadKernelError

from diffusion_checks import NOT_ATTEMPTED_MARK, PASSED_MARK
from tools.make_exercises import LESSONS, ROOT
from tools.nbrun import CurrentEnvClient, cell_text

PASSED, FAILED, NOT_ATTEMPTED, NOT_RUN = "passed", "failed", "not attempted", "not run"
STATUSES = (PASSED, FAILED, NOT_ATTEMPTED, NOT_RUN)

CHECK_CALL = re.compile(r"^[ \t]*(check_\w+)\s*\(", re.MULTILINE)
EXERCISE_PREFIX = re.compile(r"^([\w.\-]{1,80}): (.*)$", re.DOTALL)
NOTEBOOK_FRAME = re.compile(r"Cell In\[(\d+)\], line (\d+)(?:, in (\w+))?")
GENERATED_FILE = re.compile(r"\(\w+\.py, line (\d+)\)")  # where ipykernel says a SyntaxError is
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

MAX_STREAM_CHARS = 100_000  # printed characters kept per cell while running
TRUNCATED_NOTE = "\n[... more output cut by the grader ...]\n"
TIMEOUT_ENAME = "CellTimeout"  # the reply nbclient gives for a cell interrupted after its timeout
HINT_LINES, HINT_CHARS = 6, 600  # how much of a hint the report shows


# ── Results ──────────────────────────────────────────────────────────────────────────


@dataclass
class Exercise:
    """One exercise's result: ``status`` is one of :data:`STATUSES`."""

    name: str
    status: str
    detail: str = ""  # the pass line's detail, or the hint saying what is wrong
    cell: int = 0  # 1-based number of the check cell in the notebook


@dataclass
class Problem:
    """An error in a cell that is not a check (it often explains a failed check below it)."""

    cell: int  # 1-based
    where: str  # the cell's first line of code
    message: str


@dataclass
class NotebookResult:
    """Everything the grader found in one notebook."""

    path: str
    exercises: list[Exercise] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None  # why the notebook could not run to the end, if it could not
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def counts(self) -> dict[str, int]:
        return {status: sum(e.status == status for e in self.exercises) for status in STATUSES}


# ── Running a notebook ───────────────────────────────────────────────────────────────


def _is_mark_line(line: str) -> bool:
    line = line.lstrip()
    return line.startswith(PASSED_MARK) or line.startswith(NOT_ATTEMPTED_MARK)


class _GradingClient(CurrentEnvClient):
    """A notebook client that runs the current Python's kernel and caps printed output.

    Past ``max_chars`` printed characters in a cell, only the checks' result lines are kept.
    """

    def __init__(self, nb, *, max_chars: int = MAX_STREAM_CHARS, **kwargs):
        super().__init__(nb, **kwargs)
        self.max_chars = max_chars
        self._chars: dict[int, int] = {}
        self._partial: dict[int, str] = {}  # an unfinished line seen after the cap

    def output(self, outs, msg, display_id, cell_index):
        if msg["msg_type"] == "stream":
            text = self._capped(msg["content"].get("text", ""), cell_index)
            if not text:
                return None
            msg = {**msg, "content": {**msg["content"], "text": text}}
        return super().output(outs, msg, display_id, cell_index)

    def _capped(self, text: str, cell_index: int) -> str:
        used = self._chars.get(cell_index, 0)
        if used + len(text) <= self.max_chars:
            self._chars[cell_index] = used + len(text)
            return text
        head = text[: max(0, self.max_chars - used)]
        rest = self._partial.pop(cell_index, "") + text[len(head):]
        lines = rest.split("\n")
        self._partial[cell_index] = lines.pop()[-1000:]
        kept = "".join(line + "\n" for line in lines if _is_mark_line(line))
        note = TRUNCATED_NOTE if used <= self.max_chars else ""
        self._chars[cell_index] = self.max_chars + 1
        return head + note + kept


@dataclass
class Execution:
    """What happened while running a notebook (the cells themselves hold the outputs)."""

    executed: set[int] = field(default_factory=set)  # indices of code cells that ran
    timed_out: set[int] = field(default_factory=set)  # ... and of those interrupted
    stopped: str | None = None  # why execution stopped before the end, if it did
    out_of_time: int | None = None  # the cell running when the notebook time limit struck
    seconds: float = 0.0


def execute(nb, workdir: str | Path, *, cell_timeout: float = 300, timeout: float = 1800,
            max_chars: int = MAX_STREAM_CHARS, env: dict[str, str] | None = None) -> Execution:
    """Run ``nb`` in place in a fresh kernel (working directory ``workdir``), never raising.

    Every cell runs even after errors. A cell running past ``cell_timeout`` seconds is
    interrupted and the next one runs; past ``timeout`` seconds in all, the rest is skipped.
    The kernel gets the environment variables ``env`` (default: this process's).
    """
    run = Execution()
    start = time.monotonic()
    client = _GradingClient(
        nb, max_chars=max_chars, timeout=math.ceil(cell_timeout), allow_errors=True,
        interrupt_on_timeout=True, record_timing=False,
        error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": "", "traceback": []},
        on_cell_executed=lambda cell, cell_index, execute_reply: _note_timeout(
            run, cell_index, execute_reply),
        resources={"metadata": {"path": str(Path(workdir).resolve())}})
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as kernel_log:
        try:
            _run_cells(client, run, kernel_log, cell_timeout, start + timeout,
                       dict(os.environ if env is None else env))
        except DeadKernelError:
            run.stopped = "the Python kernel died (crashed, ran out of memory or was exited)"
            kernel_log.seek(0)
            last = [line for line in kernel_log.read().splitlines()
                    if line.strip() and not line.startswith("[IPKernelApp] WARNING")][-3:]
            if last:
                run.stopped += ": " + " / ".join(line.strip() for line in last)
        except Exception as err:  # the kernel would not start, a message was lost, ...
            run.stopped = f"the notebook could not run: {type(err).__name__}: {err}"
    run.seconds = time.monotonic() - start
    return run


def _note_timeout(run: Execution, cell_index: int, execute_reply) -> None:
    if execute_reply and execute_reply.get("content", {}).get("ename") == TIMEOUT_ENAME:
        run.timed_out.add(cell_index)


def _run_cells(client: _GradingClient, run: Execution, kernel_log, cell_timeout: float,
               deadline: float, env: dict[str, str]) -> None:
    with client.setup_kernel(stdout=kernel_log, stderr=kernel_log, env=env):
        info = client.wait_for_reply(client.kc.kernel_info())
        if info and "language_info" in info.get("content", {}):
            client.nb.metadata["language_info"] = info["content"]["language_info"]
        for index, cell in enumerate(client.nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                run.stopped = "the notebook time limit was reached"
                return
            client.timeout = max(1, math.ceil(min(cell_timeout, left)))
            run.executed.add(index)
            client.execute_cell(cell, index)
            if index in run.timed_out:
                if cell_timeout > left:
                    run.stopped, run.out_of_time = "the notebook time limit was reached", index
                    return
                if not _kernel_responds(client):
                    run.stopped = (f"the kernel did not respond after cell {index + 1} was "
                                   "interrupted, so the cells after it did not run")
                    return
        client.set_widgets_metadata()  # progress bars keep their final state when saved


def _kernel_responds(client: _GradingClient, seconds: int = 10) -> bool:
    """After an interrupt: whether the kernel runs a trivial statement again."""
    client.timeout = seconds
    msg_id = client.kc.execute("None", store_history=False)
    reply = client.wait_for_reply(msg_id)
    return reply is not None and reply.get("content", {}).get("status") == "ok"


# ── Reading the results ──────────────────────────────────────────────────────────────


def shorten(text: str, *, lines: int = HINT_LINES, chars: int = HINT_CHARS) -> str:
    """At most ``lines`` lines and ``chars`` characters of ``text``, saying what was cut."""
    text = ANSI.sub("", str(text)).strip()
    kept = text.splitlines()[:lines]
    short = "\n".join(line if len(line) <= chars else line[: chars - 1] + "…" for line in kept)
    if len(short) > chars:
        short = short[: chars - 1] + "…"
    hidden = len(text.splitlines()) - len(kept)
    return short + (f"\n… ({hidden} more lines)" if hidden > 0 else "")


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return shorten(line.strip(), lines=1, chars=60)
    return shorten(source.strip(), lines=1, chars=60)


def _errors(cell) -> list:
    return [out for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def _location(error, cells_by_count: dict[int, int], nb, skip: int) -> str:
    """Where in the learner's code (another cell than ``skip``) an error was raised."""
    frames = NOTEBOOK_FRAME.findall(ANSI.sub("", "\n".join(error.get("traceback", []))))
    for count, line, function in reversed(frames):
        index = cells_by_count.get(int(count))
        if index is not None and index != skip:
            name = f", in {function}" if function else ""
            return (f"\n(at cell {index + 1} `{_first_line(nb.cells[index].source)}`, "
                    f"line {line}{name})")
    return ""


def _error_message(error, index: int, run: Execution, cell_timeout: float) -> str:
    if index == run.out_of_time:
        return "the notebook time limit was reached while this cell ran, so it was interrupted"
    if index in run.timed_out or error.get("ename") == TIMEOUT_ENAME:
        return (f"this cell ran longer than the time limit ({cell_timeout:g} s) and was "
                "interrupted — is there an endless loop, or far too much work?")
    evalue = GENERATED_FILE.sub(r"(line \1)", str(error.get("evalue", "")))
    return f"{error.get('ename', 'Error')}: {evalue}"


def _check_results(nb, index: int, run: Execution, cell_timeout: float,
                   cells_by_count: dict[int, int], problems: list[Problem]) -> list[Exercise]:
    """The results of the check calls in code cell ``index``, in call order."""
    cell = nb.cells[index]
    calls = [name.removeprefix("check_") for name in CHECK_CALL.findall(cell.source)]
    found: list[Exercise] = []
    for line in cell_text(cell).splitlines():
        line = line.strip()
        for mark, status in ((PASSED_MARK, PASSED), (NOT_ATTEMPTED_MARK, NOT_ATTEMPTED)):
            if line.startswith(mark):
                name, _, detail = line[len(mark):].strip().partition(": ")
                found.append(Exercise(name or "?", status, detail, index + 1))
    errors = _errors(cell) or ([{"ename": TIMEOUT_ENAME}] if index in run.timed_out else [])
    if errors:  # the check that raised is the first one that reported nothing
        fallback = calls[len(found)] if len(found) < len(calls) else "?"
        name, hint = _failure(errors[0], fallback, nb, index, run, cell_timeout,
                              cells_by_count, problems)
        found.append(Exercise(name, FAILED, hint, index + 1))
    if index not in run.executed:
        status, reason = NOT_RUN, f"not checked: {run.stopped or 'the cell did not run'}"
    elif errors:
        status, reason = NOT_RUN, "this cell stopped at the error above before reaching this check"
    else:
        status, reason = FAILED, "the check printed no result"
    found.extend(Exercise(name, status, reason, index + 1) for name in calls[len(found):])
    return found


def _failure(error, fallback: str, nb, index: int, run: Execution, cell_timeout: float,
             cells_by_count: dict[int, int], problems: list[Problem]) -> tuple[str, str]:
    """(exercise name, hint) for the error a check cell raised."""
    match = EXERCISE_PREFIX.match(error.get("evalue", ""))
    if error.get("ename") == "AssertionError" and match:  # the check's "<exercise>: <hint>"
        return match.group(1), match.group(2)
    hint = _error_message(error, index, run, cell_timeout)
    if error.get("ename") in ("AssertionError", TIMEOUT_ENAME):
        return fallback, hint
    hint += _location(error, cells_by_count, nb, index)
    earlier = [p for p in problems if p.cell < index + 1]
    if earlier and "(at cell" not in hint:  # e.g. a NameError after a SyntaxError
        hint += (f"\n(cell {earlier[-1].cell} above failed: "
                 f"{shorten(earlier[-1].message, lines=1, chars=120)} — fix that first)")
    return fallback, hint


def read_results(nb, run: Execution, path: str, *, cell_timeout: float = 300) -> NotebookResult:
    """Turn an executed notebook into one result per exercise, in notebook order."""
    result = NotebookResult(path=path, error=run.stopped, seconds=run.seconds)
    cells_by_count = {cell.get("execution_count"): i for i, cell in enumerate(nb.cells)
                      if cell.cell_type == "code" and cell.get("execution_count")}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if CHECK_CALL.search(cell.source):
            result.exercises.extend(
                _check_results(nb, index, run, cell_timeout, cells_by_count, result.problems))
            continue
        for error in _errors(cell)[:1] or ([{}] if index in run.timed_out else []):
            if error.get("ename") == "NotImplementedError":
                continue  # an exercise not attempted yet: its check says so
            result.problems.append(Problem(index + 1, _first_line(cell.source),
                                           _error_message(error, index, run, cell_timeout)))
    return result


def grade_notebook(path: str | Path, *, cell_timeout: float = 300, timeout: float = 1800,
                   max_chars: int = MAX_STREAM_CHARS) -> NotebookResult:
    """Run the notebook at ``path`` in a fresh kernel and grade every exercise in it."""
    path = Path(path)
    shown = _display_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.read(path, as_version=4)
    except Exception as err:  # not JSON (a merge conflict?), not a notebook, unreadable
        return NotebookResult(path=shown, error=f"could not read the notebook: "
                                                f"{type(err).__name__}: {shorten(err, lines=2)}")
    run = execute(nb, path.parent, cell_timeout=cell_timeout, timeout=timeout,
                  max_chars=max_chars)
    return read_results(nb, run, shown, cell_timeout=cell_timeout)


def exit_code(results: list[NotebookResult], *, fail_on_not_attempted: bool = False) -> int:
    """1 when an exercise failed or did not run, a notebook stopped early, or (when asked)
    an exercise is not attempted; else 0."""
    for result in results:
        counts = result.counts()
        if result.error or counts[FAILED] or counts[NOT_RUN]:
            return 1
        if fail_on_not_attempted and counts[NOT_ATTEMPTED]:
            return 1
    return 0


# ── Reporting ────────────────────────────────────────────────────────────────────────


class _Style:
    """ANSI colours for a terminal or a GitHub Actions log (``NO_COLOR`` turns them off)."""

    CODES = {PASSED: "32", FAILED: "1;31", NOT_ATTEMPTED: "33", NOT_RUN: "1;31", "dim": "2",
             "bold": "1"}

    def __init__(self, stream):
        self.on = not os.environ.get("NO_COLOR") and (
            bool(os.environ.get("FORCE_COLOR")) or os.environ.get("GITHUB_ACTIONS") == "true"
            or (hasattr(stream, "isatty") and stream.isatty()))

    def __call__(self, text: str, kind: str) -> str:
        return f"\x1b[{self.CODES[kind]}m{text}\x1b[0m" if self.on else text


SYMBOLS = {PASSED: "✔", FAILED: "✘", NOT_ATTEMPTED: "○", NOT_RUN: "✘"}
LABELS = {PASSED: "passed", FAILED: "FAILED", NOT_ATTEMPTED: "not attempted", NOT_RUN: "NOT RUN"}


def summary_line(result: NotebookResult) -> str:
    """e.g. ``01_forward_process: 4 passed, 1 failed, 0 not attempted``."""
    return f"{result.name}: {_counts_text(result.counts())}" + (
        f" — stopped early: {result.error}" if result.error else "")


def _counts_text(counts: dict[str, int]) -> str:
    text = (f"{counts[PASSED]} passed, {counts[FAILED]} failed, "
            f"{counts[NOT_ATTEMPTED]} not attempted")
    return text + (f", {counts[NOT_RUN]} not run" if counts[NOT_RUN] else "")


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def report(result: NotebookResult, style: _Style) -> str:
    """The human-readable report for one notebook."""
    lines = [style(f"━━ {result.path}", "bold") + style(f"  ({result.seconds:.1f} s)", "dim")]
    width = max([len(e.name) for e in result.exercises] + [8])
    for ex in result.exercises:
        label = style(f"{SYMBOLS[ex.status]} {LABELS[ex.status]:<13}", ex.status)
        if ex.status == PASSED:
            lines.append(f"  {label} {ex.name:<{width}}  "
                         + style(shorten(ex.detail, lines=1, chars=90), "dim"))
        elif ex.status == NOT_ATTEMPTED:
            lines.append(f"  {label} {ex.name}")
        else:
            lines.append(f"  {label} {ex.name}" + style(f"  (cell {ex.cell})", "dim"))
            lines.append(_indent(shorten(ex.detail), "        "))
    if not result.exercises and not result.error:
        lines.append("  (no check_...() cells found in this notebook)")
    if result.problems:
        lines.append("  Other cells that raised errors (these can cause failures above):")
        for problem in result.problems[:5]:
            message = shorten(problem.message, lines=2, chars=200)
            lines.append(f"    cell {problem.cell} `{problem.where}`:")
            lines.append(_indent(message, "        "))
        if len(result.problems) > 5:
            lines.append(f"    … and {len(result.problems) - 5} more")
    if result.error:
        lines.append(style(f"  ✘ the notebook stopped early: {shorten(result.error, lines=3)}",
                           FAILED))
    lines.append(style(summary_line(result), "bold"))
    return "\n".join(lines)


def total_report(results: list[NotebookResult], code: int, style: _Style,
                 fail_on_not_attempted: bool) -> str:
    counts = {s: sum(r.counts()[s] for r in results) for s in STATUSES}
    broken = sum(bool(r.error) for r in results)
    plural = "s" if len(results) != 1 else ""
    line = f"TOTAL: {_counts_text(counts)} in {len(results)} notebook{plural}"
    if broken:
        line += f" ({broken} stopped early)"
    if code == 0:
        verdict = "✔ every attempted exercise passes"
        if counts[NOT_ATTEMPTED]:
            verdict += f" ({counts[NOT_ATTEMPTED]} not attempted yet)"
        return style(line, "bold") + "\n" + style(verdict, PASSED)
    reasons = []
    if counts[FAILED]:
        reasons.append(f"{counts[FAILED]} exercise{'s' if counts[FAILED] != 1 else ''} failed")
    if broken:
        reasons.append(f"{broken} notebook{'s' if broken != 1 else ''} stopped early")
    if counts[NOT_RUN]:
        reasons.append(f"{counts[NOT_RUN]} check{'s' if counts[NOT_RUN] != 1 else ''} did not run")
    if fail_on_not_attempted and counts[NOT_ATTEMPTED]:
        n = counts[NOT_ATTEMPTED]
        reasons.append(f"{n} exercise{'s' if n != 1 else ''} not attempted yet "
                       "(--fail-on-not-attempted)")
    advice = ("read the hints above, fix, and grade again" if counts[FAILED] or counts[NOT_RUN]
              or broken else "fill them in and grade again")
    return style(line, "bold") + "\n" + style(f"✘ {'; '.join(reasons)} — {advice}", FAILED)


def github_annotations(results: list[NotebookResult]) -> list[str]:
    """``::error`` lines that GitHub Actions shows on the run's summary page."""
    def escape(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    lines = []
    for result in results:
        for ex in result.exercises:
            if ex.status in (FAILED, NOT_RUN):
                lines.append(f"::error file={result.path},title={escape(ex.name)} "
                             f"{ex.status}::{escape(shorten(ex.detail, lines=3, chars=300))}")
        if result.error:
            lines.append(f"::error file={result.path},title=notebook stopped early::"
                         f"{escape(shorten(result.error, lines=2))}")
    return lines


def markdown_summary(results: list[NotebookResult]) -> str:
    """A Markdown table of the results (for GitHub's job summary page)."""
    rows = ["| notebook | exercise | result | hint |", "|---|---|---|---|"]
    for result in results:
        for ex in result.exercises:
            hint = "" if ex.status == PASSED else shorten(ex.detail, lines=2, chars=200)
            hint = hint.replace("|", "\\|").replace("\n", "<br>")
            rows.append(f"| {result.name} | `{ex.name}` | {SYMBOLS[ex.status]} "
                        f"{LABELS[ex.status]} | {hint} |")
        if result.error:
            rows.append(f"| {result.name} | | ✘ stopped early | "
                        f"{shorten(result.error, lines=1, chars=200).replace('|', '/')} |")
    lines = [summary_line(r) for r in results]
    return "## Exercise grades\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + \
        "\n".join(rows) + "\n"


def to_json(results: list[NotebookResult], code: int) -> dict:
    return {
        "course_scale": os.environ.get("COURSE_SCALE"),
        "exit_code": code,
        "total": {s: sum(r.counts()[s] for r in results) for s in STATUSES},
        "notebooks": [{**asdict(r), "name": r.name, "counts": r.counts()} for r in results],
    }


# ── Command line ─────────────────────────────────────────────────────────────────────


def _display_path(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def lesson_paths(folder: Path = LESSONS) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def resolve(targets: list[str], lessons: Path = LESSONS) -> list[Path]:
    """Notebook paths from paths, folders or lesson-name prefixes (default: every lesson)."""
    if not targets:
        return lesson_paths(lessons)
    paths: list[Path] = []
    for target in targets:
        candidate = Path(target)
        if candidate.is_dir():
            paths.extend(lesson_paths(candidate) or sorted(candidate.glob("*.ipynb")))
        elif candidate.is_file():
            paths.append(candidate)
        else:
            matches = [p for p in lesson_paths(lessons) if p.name.startswith(target)]
            if not matches:
                known = ", ".join(p.stem for p in lesson_paths(lessons)) or "none"
                raise SystemExit(f"grade: no notebook or lesson matches {target!r} "
                                 f"(lessons in {_display_path(lessons)}: {known})")
            paths.extend(matches)
    return list(dict.fromkeys(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.grade", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*",
                        help="notebook paths, folders or lesson prefixes such as 01 "
                             "(default: every notebook in lessons/)")
    parser.add_argument("--fail-on-not-attempted", action="store_true",
                        help="exit 1 also when an exercise is not attempted yet")
    parser.add_argument("--cell-timeout", type=float, default=300, metavar="S",
                        help="interrupt a cell after S seconds (default: 300)")
    parser.add_argument("--timeout", type=float, default=1800, metavar="S",
                        help="stop a notebook after S seconds in all (default: 1800)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a console without ✔ still gets the report

    try:
        paths = resolve(args.notebooks)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    if not paths:
        print(f"grade: no notebooks to grade in {_display_path(LESSONS)}", file=sys.stderr)
        return 2

    os.environ.setdefault("COURSE_SCALE", "ci")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # The kernel imports the course from this checkout, whatever else is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    style = _Style(sys.stdout)
    print(f"Grading {len(paths)} notebook{'s' if len(paths) != 1 else ''} in a fresh kernel "
          f"(COURSE_SCALE={os.environ['COURSE_SCALE']}, cell time limit {args.cell_timeout:g} s, "
          f"notebook time limit {args.timeout:g} s)\n", flush=True)
    results = []
    for path in paths:
        print(style(f"running {_display_path(path)} ...", "dim"), flush=True)
        result = grade_notebook(path, cell_timeout=args.cell_timeout, timeout=args.timeout)
        results.append(result)
        print(report(result, style) + "\n", flush=True)

    code = exit_code(results, fail_on_not_attempted=args.fail_on_not_attempted)
    print(total_report(results, code, style, args.fail_on_not_attempted))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print("\n".join(github_annotations(results)))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as out:
                out.write(markdown_summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, code), indent=2,
                                              ensure_ascii=False) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
