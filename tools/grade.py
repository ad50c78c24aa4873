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

An exercise is named by the heading of the notebook section that holds its check call
(``## Exercise 5 · `q_sample`: jump straight to step t`` is reported as "Exercise 5 ·
q_sample: jump straight to step t"), the name the check itself prints. An error elsewhere is
located by the heading it is under and the first line of its cell, as a learner sees them.

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

import diffusion_checks
from diffusion_checks import NOT_ATTEMPTED_MARK, PASSED_MARK
from tools.make_exercises import LESSONS, ROOT
from tools.nbrun import CurrentEnvClient, cell_text

PASSED, FAILED, NOT_ATTEMPTED, NOT_RUN = "passed", "failed", "not attempted", "not run"
STATUSES = (PASSED, FAILED, NOT_ATTEMPTED, NOT_RUN)

CHECK_CALL = re.compile(r"^[ \t]*(check_\w+)\s*\(", re.MULTILINE)
ONE_WORD_PREFIX = re.compile(r"^([\w.\-]{1,80}): (.*)$", re.DOTALL)  # "q_sample: <hint>"
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")  # Markdown "## Title"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")  # opens or closes a fenced code block
EXERCISE_HEADING = re.compile(r"^Exercise\b")
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

    name: str  # the heading of the exercise's section, e.g. "Exercise 2 · The cosine schedule"
    status: str
    detail: str = ""  # the pass line's detail, or the hint saying what is wrong
    cell: int = 0  # 1-based index of the check cell, for tools (never shown to the learner)
    check: str = ""  # the check function called, e.g. "check_cosine_beta_schedule"


@dataclass
class Problem:
    """An error in a cell that is not a check (it often explains a failed check below it)."""

    cell: int  # 1-based index, for tools (never shown to the learner)
    where: str  # the cell's first line of code
    message: str
    section: str = ""  # the heading the cell is under ("" before the first heading)

    @property
    def place(self) -> str:
        """Where the cell is, as the learner sees it."""
        return cell_place(self.section, self.where)


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


# ── Where a cell is: the headings it is under ────────────────────────────────────────


def heading_name(text: str) -> str:
    """A heading's text as the learner reads it: without backticks and ``$``, e.g.
    ``Exercise 5 · `q_sample`: jump`` -> ``Exercise 5 · q_sample: jump``."""
    return " ".join(text.replace("`", "").replace("$", "").split())


def markdown_headings(source: str) -> list[tuple[int, str]]:
    """(level, name) of each ``#`` heading in a Markdown cell (not those in fenced code)."""
    found, fence = [], None
    for line in source.splitlines():
        opens = FENCE.match(line)
        if opens:
            marker = opens.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        heading = HEADING.match(line) if fence is None else None
        if heading:
            found.append((len(heading.group(1)), heading_name(heading.group(2))))
    return found


@dataclass(frozen=True)
class Section:
    """The headings a cell is under."""

    exercise: str = ""  # the enclosing section whose heading starts with "Exercise", if any
    heading: str = ""  # the nearest heading above the cell (its innermost section)


def cell_sections(nb) -> list[Section]:
    """The :class:`Section` of every cell of ``nb``, by index.

    A heading opens a section that lasts until the next heading of the same or a higher
    level, so a check under ``### What you should see`` inside ``## Exercise 3 · ...``
    belongs to exercise 3, and one under a later ``## Training for real`` to no exercise.
    """
    stack: list[tuple[int, str]] = []
    sections = []
    for cell in nb.cells:
        exercise = next((name for _, name in reversed(stack) if EXERCISE_HEADING.match(name)), "")
        sections.append(Section(exercise, stack[-1][1] if stack else ""))
        if cell.cell_type == "markdown":
            for level, name in markdown_headings(cell.source):
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, name))
    return sections


def cell_place(heading: str, first_line: str) -> str:
    """e.g. ``under “Exercise 2 · The cosine schedule”, in the cell starting `def cos...```."""
    where = f"in the cell starting `{first_line}`"
    return f"under “{heading}”, {where}" if heading else where


def _place(nb, index: int, sections: list[Section] | None = None) -> str:
    sections = sections or cell_sections(nb)
    return cell_place(sections[index].heading, _first_line(nb.cells[index].source))


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
                    run.stopped = ("the kernel did not respond after the cell "
                                   f"{_place(client.nb, index)} was interrupted, so the cells "
                                   "after it did not run")
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


@dataclass
class _Notebook:
    """An executed notebook with what reading its results needs."""

    nb: object
    run: Execution
    cell_timeout: float
    sections: list[Section]
    cells_by_count: dict[int, int]  # execution count -> cell index
    problems: list[Problem]


def _location(error, book: _Notebook, skip: int) -> str:
    """Where in the learner's code (another cell than ``skip``) an error was raised."""
    frames = NOTEBOOK_FRAME.findall(ANSI.sub("", "\n".join(error.get("traceback", []))))
    for count, line, function in reversed(frames):
        index = book.cells_by_count.get(int(count))
        if index is not None and index != skip:
            name = f", in {function}" if function else ""
            return f"\n(raised {_place(book.nb, index, book.sections)}, line {line}{name})"
    return ""


def _error_message(error, index: int, run: Execution, cell_timeout: float) -> str:
    if index == run.out_of_time:
        return "the notebook time limit was reached while this cell ran, so it was interrupted"
    if index in run.timed_out or error.get("ename") == TIMEOUT_ENAME:
        return (f"this cell ran longer than the time limit ({cell_timeout:g} s) and was "
                "interrupted — is there an endless loop, or far too much work?")
    evalue = GENERATED_FILE.sub(r"(line \1)", str(error.get("evalue", "")))
    return f"{error.get('ename', 'Error')}: {evalue}"


def _known_names(check: str, section: Section) -> list[str]:
    """The names a check may print for its exercise: the section heading, and the name
    ``diffusion_checks`` gives it (the two agree in a course notebook)."""
    known = [section.exercise, getattr(getattr(diffusion_checks, check, None), "exercise", "")]
    return [name for name in dict.fromkeys(known) if isinstance(name, str) and name]


def _split_name(text: str, known: list[str]) -> tuple[str, str] | None:
    """(name, rest) when ``text`` is ``"<name>: <rest>"`` for one of the ``known`` names
    (which may themselves hold ": "), else None."""
    for name in sorted(known, key=len, reverse=True):
        if text == name or text.startswith(name + ":"):
            return name, text[len(name) + 1:].strip()
    return None


def _check_results(book: _Notebook, index: int) -> list[Exercise]:
    """The results of the check calls in code cell ``index``, in call order.

    A cell holding one check is named by its section's "Exercise" heading; otherwise (no
    such heading, or several checks in one cell) each result is named by what its check
    printed, else by the name ``diffusion_checks`` gives that check, else by the check's
    function name without ``check_``.
    """
    cell, run, section = book.nb.cells[index], book.run, book.sections[index]
    calls = CHECK_CALL.findall(cell.source)
    heading = section.exercise if len(calls) == 1 else ""

    def exercise(position: int, printed: str, status: str, detail: str) -> Exercise:
        check = calls[position] if position < len(calls) else ""
        fallback = getattr(getattr(diffusion_checks, check, None), "exercise", None)
        if not isinstance(fallback, str) or not fallback:
            fallback = check.removeprefix("check_") or "?"
        return Exercise(heading or printed or fallback, status, detail, index + 1, check)

    found: list[Exercise] = []
    for line in cell_text(cell).splitlines():
        line = line.strip()
        for mark, status in ((PASSED_MARK, PASSED), (NOT_ATTEMPTED_MARK, NOT_ATTEMPTED)):
            if line.startswith(mark):
                text = line[len(mark):].strip()
                check = calls[len(found)] if len(found) < len(calls) else ""
                printed, detail = (_split_name(text, _known_names(check, section))
                                   or text.partition(": ")[::2])
                found.append(exercise(len(found), printed, status, detail))
    errors = _errors(cell) or ([{"ename": TIMEOUT_ENAME}] if index in run.timed_out else [])
    if errors:  # the check that raised is the first one that reported nothing
        check = calls[len(found)] if len(found) < len(calls) else ""
        printed, hint = _failure(errors[0], _known_names(check, section), book, index)
        found.append(exercise(len(found), printed, FAILED, hint))
    if index not in run.executed:
        status, reason = NOT_RUN, f"not checked: {run.stopped or 'the cell did not run'}"
    elif errors:
        status, reason = NOT_RUN, "this cell stopped at the error above before reaching this check"
    else:
        status, reason = FAILED, "the check printed no result"
    found.extend(exercise(i, "", status, reason) for i in range(len(found), len(calls)))
    return found


def _failure(error, known: list[str], book: _Notebook, index: int) -> tuple[str, str]:
    """(the exercise name the check gave, or "", hint) for the error a check cell raised."""
    evalue = str(error.get("evalue", ""))
    if error.get("ename") == "AssertionError":  # the check's "<exercise>: <hint>"
        named = _split_name(evalue, known)
        if named:
            return named
        match = ONE_WORD_PREFIX.match(evalue)
        if match:
            return match.group(1), match.group(2)
    hint = _error_message(error, index, book.run, book.cell_timeout)
    if error.get("ename") in ("AssertionError", TIMEOUT_ENAME):
        return "", hint
    location = _location(error, book, index)
    earlier = [p for p in book.problems if p.cell < index + 1]
    if earlier and not location:  # e.g. a NameError after a SyntaxError
        location = (f"\n(an error above, {earlier[-1].place}, may be the cause: "
                    f"{shorten(earlier[-1].message, lines=1, chars=120)} — fix that first)")
    return "", hint + location


def read_results(nb, run: Execution, path: str, *, cell_timeout: float = 300) -> NotebookResult:
    """Turn an executed notebook into one result per exercise, in notebook order."""
    result = NotebookResult(path=path, error=run.stopped, seconds=run.seconds)
    book = _Notebook(nb, run, cell_timeout, cell_sections(nb),
                     {cell.get("execution_count"): i for i, cell in enumerate(nb.cells)
                      if cell.cell_type == "code" and cell.get("execution_count")},
                     result.problems)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if CHECK_CALL.search(cell.source):
            result.exercises.extend(_check_results(book, index))
            continue
        for error in _errors(cell)[:1] or ([{}] if index in run.timed_out else []):
            if error.get("ename") == "NotImplementedError":
                continue  # an exercise not attempted yet: its check says so
            result.problems.append(Problem(index + 1, _first_line(cell.source),
                                           _error_message(error, index, run, cell_timeout),
                                           book.sections[index].heading))
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
    width = min(max([len(e.name) for e in result.exercises] + [8]), 48)
    for ex in result.exercises:
        label = style(f"{SYMBOLS[ex.status]} {LABELS[ex.status]:<13}", ex.status)
        if ex.status == PASSED:
            lines.append(f"  {label} {ex.name:<{width}}  "
                         + style(shorten(ex.detail, lines=1, chars=90), "dim"))
        elif ex.status == NOT_ATTEMPTED:
            lines.append(f"  {label} {ex.name}")
        else:
            lines.append(f"  {label} {ex.name}")
            lines.append(_indent(shorten(ex.detail), "        "))
    if not result.exercises and not result.error:
        lines.append("  (no check_...() cells found in this notebook)")
    if result.problems:
        lines.append("  Other cells that raised errors (these can cause failures above):")
        for problem in result.problems[:5]:
            message = shorten(problem.message, lines=2, chars=200)
            lines.append(f"    {problem.place[0].upper()}{problem.place[1:]}:")
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

    def escape_property(text: str) -> str:  # a name holds ":" and "," (property separators)
        return escape(text).replace(":", "%3A").replace(",", "%2C")

    lines = []
    for result in results:
        file = escape_property(result.path)
        for ex in result.exercises:
            if ex.status in (FAILED, NOT_RUN):
                lines.append(f"::error file={file},title={escape_property(ex.name)} — "
                             f"{ex.status}::{escape(shorten(ex.detail, lines=3, chars=300))}")
        if result.error:
            lines.append(f"::error file={file},title=notebook stopped early::"
                         f"{escape(shorten(result.error, lines=2))}")
    return lines


def markdown_summary(results: list[NotebookResult]) -> str:
    """A Markdown table of the results (for GitHub's job summary page)."""
    rows = ["| notebook | exercise | result | hint |", "|---|---|---|---|"]
    for result in results:
        for ex in result.exercises:
            hint = "" if ex.status == PASSED else shorten(ex.detail, lines=2, chars=200)
            hint = hint.replace("|", "\\|").replace("\n", "<br>")
            rows.append(f"| {result.name} | {_markdown_text(ex.name)} | {SYMBOLS[ex.status]} "
                        f"{LABELS[ex.status]} | {hint} |")
        if result.error:
            rows.append(f"| {result.name} | | ✘ stopped early | "
                        f"{shorten(result.error, lines=1, chars=200).replace('|', '/')} |")
    lines = [summary_line(r) for r in results]
    return "## Exercise grades\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + \
        "\n".join(rows) + "\n"


def _markdown_text(text: str) -> str:
    """``text`` shown literally in a Markdown table cell (``x_{t-1}``, ``a|b``, ``2*x``)."""
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", text)


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
