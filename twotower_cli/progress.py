"""Progress of `twotower gen` on stderr: a live display on a terminal, plain log lines otherwise.

Torch-free. Both read the pipeline's `Progress` counters (one object shared with the run loop):

- a terminal gets a rich bar: rows done/total, elapsed, rows/s, tokens/s, tokens/step, rejects
  and a smoothed ETA, refreshed at most 5 times a second;
- anything else (cron, a log file, `2> log`) gets one plain line every `log_every` seconds from a
  timer thread (so a run whose rows take minutes still leaves a trace), and the same line at the
  end:

    gen: 120/500 rows (24.0%) | 3.21 rows/s | 410 tok/s | 3.05 tok/step | 0 rejected | elapsed 37s
        | ETA 1m58s   (one line; `| N skipped (done before)` on a resumed run)

Rates count decoding time only (from the first decoded row's start, after the model loaded);
the ETA is the rows left over the rows/s of the last `ETA_WINDOW_S` seconds (the whole run's rate
until that window has filled), so one slow batch does not make it jump.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

ETA_WINDOW_S = 60.0


def fmt_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Rates:
    """Rows/s over the last `window` seconds of decoding, for a smoothed ETA."""

    def __init__(self, window: float = ETA_WINDOW_S):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def rows_per_s(self, now: float, done: int, started: float) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        if now - t0 >= min(self.window, 5.0) and done > n0:
            return (done - n0) / (now - t0)
        el = now - started
        return done / el if el > 0 else 0.0


def snapshot(p: Any, total: int | None, rates: Rates, now: float | None = None) -> dict[str, Any]:
    """The numbers both displays show, from the pipeline's Progress `p`."""
    now = time.perf_counter() if now is None else now
    decoding = p.decode_started is not None
    el = max(now - p.decode_started, 1e-9) if decoding else 0.0
    finished = p.rows + p.rejected  # rows this run settled (skipped ones cost nothing)
    done = finished + p.skipped
    rate = rates.rows_per_s(now, finished, p.decode_started) if decoding else 0.0
    left = None if total is None else max(total - done, 0)
    return {
        "done": done, "total": total, "rows": p.rows, "rejected": p.rejected, "skipped": p.skipped,
        "elapsed": el, "rows_per_s": p.rows / el if el else 0.0, "tokens_per_s": p.tokens / el if el else 0.0,
        "tokens_per_step": p.tokens / p.steps if p.steps else 0.0,
        "eta": (left / rate if rate > 0 else None) if left is not None else None,
        "phase": p.phase, "stopping": p.stopping,
    }


def log_line(s: dict[str, Any]) -> str:
    total = s["total"]
    rows = f"{s['done']:,}/{total:,} rows" if total is not None else f"{s['done']:,} rows"
    if total:
        rows += f" ({100 * s['done'] / total:.1f}%)"
    parts = [f"gen: {rows}"]
    if s["phase"] == "loading":
        parts.append("loading the model")
    parts += [f"{s['rows_per_s']:.2f} rows/s", f"{s['tokens_per_s']:,.0f} tok/s",
              f"{s['tokens_per_step']:.2f} tok/step", f"{s['rejected']:,} rejected"]
    if s["skipped"]:
        parts.append(f"{s['skipped']:,} skipped (done before)")
    parts.append(f"elapsed {fmt_duration(s['elapsed'])}")
    if total is not None and s["phase"] != "done":
        parts.append(f"ETA {fmt_duration(s['eta'])}")
    if s["stopping"]:
        parts.append("stopping")
    return " | ".join(parts)


class LogLines:
    """No terminal: a plain line every `every` seconds (timer thread) and one at the end."""

    def __init__(self, progress: Any, total: int | None, every: float, stream: TextIO | None = None):
        self.p, self.total, self.every = progress, total, every
        self.stream = stream or sys.stderr
        self.rates = Rates()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _emit(self) -> None:
        with self._lock:
            line = log_line(snapshot(self.p, self.total, self.rates))
            try:
                print(line, file=self.stream, flush=True)
            except (OSError, ValueError):  # stderr closed: nothing to log to
                pass

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._emit()

    def __enter__(self) -> LogLines:
        self._thread = threading.Thread(target=self._tick, name="twotower-log", daemon=True)
        self._thread.start()
        return self

    def update(self, p: Any, force: bool = False) -> None:
        self.p = p

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc_type is None and self.p.phase == "done" and not self.p.nothing_to_do:
            self._emit()  # the final line


class Live:
    """A terminal: a rich bar with rows, elapsed, rows/s, tokens/s, tokens/step, rejects, ETA."""

    def __init__(self, progress: Any, total: int | None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.p, self.total, self.rates, self.last = progress, total, Rates(), 0.0
        cols = [TextColumn("[bold]gen"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
        self.bar = Progress(*cols, console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("gen", total=total, info="")

    def __enter__(self) -> Live:
        self.bar.start()
        return self

    def update(self, p: Any, force: bool = False) -> None:
        self.p = p
        now = time.perf_counter()
        if now - self.last < 0.2 and not force:
            return
        self.last = now
        s = snapshot(p, self.total, self.rates, now)
        if s["phase"] == "loading":
            info = "loading the model…"
        else:
            info = (f"{fmt_duration(s['elapsed'])}  {s['rows_per_s']:.2f} rows/s  {s['tokens_per_s']:,.0f} tok/s  "
                    f"{s['tokens_per_step']:.2f} tok/step  rejected {s['rejected']}")
            if s["skipped"]:
                info += f"  skipped {s['skipped']}"
            if self.total is not None and s["phase"] != "done":
                info += f"  ETA {fmt_duration(s['eta'])}"
        if p.stopping:
            info += "  [yellow]stopping…"
        self.bar.update(self.task, completed=s["done"], info=info)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or self.p.nothing_to_do:
            # An error (bad input, locked or mismatched directory) is one line on stderr, and a
            # no-op rerun one note: erase the bar instead of leaving it above them.
            self.bar.live.transient = True
        else:
            self.update(self.p, force=True)
        self.bar.stop()


class Silent:
    def __init__(self, progress: Any = None):
        self.p = progress

    def __enter__(self) -> Silent:
        return self

    def update(self, p: Any, force: bool = False) -> None:
        self.p = p

    def __exit__(self, *exc: object) -> None:
        return None


def display(progress: Any, total: int | None, *, quiet: bool, log_every: float,
            stream: TextIO | None = None) -> Silent | LogLines | Live:
    """The display for this stderr: none with -q, rich on a terminal, log lines otherwise."""
    err = stream or sys.stderr
    if quiet:
        return Silent(progress)
    try:
        tty = err.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Live(progress, total) if tty and stream is None else LogLines(progress, total, log_every, err)
