"""A compact live progress table for the driver's terminal (a Ray Tune callback).

On a terminal the table is redrawn in place (cursor up over the last drawing, clear to the
end of the screen, draw), as Ray Tune's console reporter does; piped to a file it is printed
once and then only the rows that changed, under a title line with the trial count.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

from tuning.tracking.names import short_key, short_value

# ANSI/VT100: move the cursor N lines up, to column 0, and clear from there to the end of
# the screen, so the next drawing replaces the last one.
CURSOR_UP = "\x1b[{n}A"
CLEAR_DOWN = "\r\x1b[J"
TTY_EVERY_S = 2.0  # in place, a redraw costs no scrollback: a short interval is fine
PIPED_EVERY_S = 15.0  # in a log file, every print is kept


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


@dataclass
class Table:
    """The progress table as lines: a title, the column header and one row per trial."""

    title: str
    header: str
    rows: dict[str, str]  # trial id -> its row, in trial order
    finished: set[str] = field(default_factory=set)  # trial ids TERMINATED or ERROR

    def lines(self) -> list[str]:
        return [self.title, self.header, *self.rows.values()]


class ProgressCallback(Callback):
    """Shows one line per trial (status, step, loss, grad norm, NaN events, the swept
    values) every `every_s` seconds and whenever a trial ends, if anything changed.

    ``in_place`` None: redraw in place when the stream is a terminal (``isatty()``), else
    print only the changed rows. ``stream`` None: ``sys.stdout`` at each print.
    """

    def __init__(self, total_trials: int, every_s: float | None = None,
                 stream: TextIO | None = None, in_place: bool | None = None) -> None:
        self.total_trials, self.every_s = total_trials, every_s
        self.stream, self.in_place = stream, in_place
        self._last: dict[str, dict[str, Any]] = {}
        # Ray calls on_trial_complete/-error before it sets the trial's status: the row of
        # the trial that just ended would still say RUNNING.
        self._ended: dict[str, str] = {}
        self._printed = -float("inf")
        self._shown: Table | None = None  # the last table printed
        self._drawn = 0  # terminal lines the last in-place drawing took

    def __getstate__(self) -> dict[str, Any]:  # pickled into Ray's experiment state
        return {"total_trials": self.total_trials, "every_s": self.every_s,
                "in_place": self.in_place}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._last[trial.trial_id] = {k: result.get(k) for k in
                                      ("step", "loss", "grad_norm", "nan_events", "end_reason")}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        every = self.every_s
        if every is None:
            every = TTY_EVERY_S if self._live(self._stream()) else PIPED_EVERY_S
        if time.monotonic() - self._printed >= every:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = "TERMINATED"
        self._print(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = "ERROR"
        self._print(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.pop(trial.trial_id, None)  # a retried trial runs again

    def on_experiment_end(self, trials: list, **info) -> None:
        self._print(trials)  # the statuses as Ray left them: the table's last word

    def _stream(self) -> TextIO:
        return self.stream or sys.stdout  # looked up per print: a redirected stdout is honoured

    def _live(self, stream: TextIO) -> bool:
        if self.in_place is not None:
            return self.in_place
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())

    def _print(self, trials: list) -> None:
        self._printed = time.monotonic()
        table = build_table(trials, self._last, self.total_trials, self._ended)
        stream = self._stream()
        text = (self._redraw(table, stream) if self._live(stream)
                else changed_lines(self._shown, table))
        self._shown = table
        if text:
            stream.write(text)
            stream.flush()

    def _redraw(self, table: Table, stream: TextIO) -> str:
        if self._shown is not None and table.lines() == self._shown.lines():
            return ""
        columns, rows = _terminal_size(stream)
        lines = fit_rows(table, rows - 1)
        up = CURSOR_UP.format(n=self._drawn) + CLEAR_DOWN if self._drawn else ""
        # A line wider than the terminal wraps onto more rows: count those, or the next
        # cursor-up stops short and leaves a stale copy of the table's top behind.
        self._drawn = sum(max(1, -(-len(line) // columns)) for line in lines)
        return up + "\n".join(lines) + "\n"


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real terminal (a test's stream)
        size = shutil.get_terminal_size()
    return max(size.columns, 20), max(size.lines, 4)


def fit_rows(table: Table, height: int) -> list[str]:
    """The table's lines, at most ``height`` of them: a drawing taller than the terminal
    could not be moved back over. Finished trials make room first; a last line counts what
    is left out."""
    lines = table.lines()
    if len(lines) <= height:
        return lines
    keep = max(height - 3, 0)  # title, header and the "not shown" line
    ids = list(table.rows)
    first = [t for t in ids if t not in table.finished] + [t for t in ids if t in table.finished]
    shown = set(first[:keep])
    kept = [table.rows[t] for t in ids if t in shown]
    return [table.title, table.header, *kept,
            f"  ... {len(ids) - len(kept)} more trials (all of them in the report)"]


def changed_lines(before: Table | None, now: Table) -> str:
    """What a piped log gets: the whole table the first time or when its columns changed,
    else the title and the rows that differ from ``before``; "" when nothing changed (trials
    waiting as PENDING would otherwise repeat the same block every interval)."""
    if before is None or before.header != now.header:
        return "\n".join(now.lines()) + "\n"
    changed = [row for tid, row in now.rows.items() if before.rows.get(tid) != row]
    return "\n".join([now.title, *changed]) + "\n" if changed else ""


def build_table(trials: list, last: dict[str, dict[str, Any]], total: int,
                ended: dict[str, str] | None = None) -> Table:
    """The progress table: one row per trial, every swept key as a column (short names).
    ``ended``: trial id -> the status of a trial whose end Ray reported but not yet set."""
    ended = ended or {}
    status = {t.trial_id: str(t.status) if str(t.status) in ("TERMINATED", "ERROR")
              else ended.get(t.trial_id, str(t.status)) for t in trials}
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.config if k not in keys]
    heads = [short_key(k) for k in keys]
    cells = [[short_value(t.config.get(k)) if k in t.config else "-" for k in keys]
             for t in trials]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    swept_head = "".join(f"  {h:>{w}}" for h, w in zip(heads, widths, strict=True))
    header = (f"  {'trial':<14}{'status':<11}{'step':>6}{'loss':>10}{'gnorm':>9}{'nan':>5}"
              + swept_head)
    rows = {}
    for t, row in zip(trials, cells, strict=True):
        r = last.get(t.trial_id, {})
        swept = "".join(f"  {v:>{w}}" for v, w in zip(row, widths, strict=True))
        rows[t.trial_id] = (f"  {t.trial_id:<14}{status[t.trial_id]:<11}{_fmt(r.get('step')):>6}"
                            f"{_fmt(r.get('loss')):>10}{_fmt(r.get('grad_norm'), '.3g'):>9}"
                            f"{_fmt(r.get('nan_events')):>5}" + swept)
    finished = {tid for tid, word in status.items() if word in ("TERMINATED", "ERROR")}
    return Table(f"[sweep] {len(finished)}/{total} trials done", header, rows, finished)


def format_table(trials: list, last: dict[str, dict[str, Any]], total: int) -> str:
    """The whole progress table as text."""
    return "\n".join(build_table(trials, last, total).lines())
