"""Progress for jobs that run for hours: one coordinator line for the whole job.

Records done across all ranks (counted as their chunks reach the journal), the rate since this run
started and the time left. On a terminal it is a tqdm bar; without one (mpirun, CI, nohup) it is a
log line every `interval` seconds, and always one at the end.
"""
from __future__ import annotations

import sys
import time

from hvdinfer import runtime


def eta_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(done: int, total: int, fresh: int, elapsed: float, unit: str = "records") -> str:
    """`done` of `total` (of which `fresh` in this run, over `elapsed` seconds), rate and ETA."""
    rate = fresh / elapsed if elapsed > 0 else 0.0
    share = 100.0 * done / total if total else 100.0
    eta = eta_text((total - done) / rate) if rate > 0 and done < total else "--"
    shown = f"{rate:,.2f}" if rate < 10 else f"{rate:,.1f}"  # training runs a few steps a second
    return f"progress: {done:,}/{total:,} {unit} ({share:.1f}%), {shown} {unit}/s, ETA {eta}"


class Progress:
    """Coordinator only; `update` from any one thread."""

    def __init__(self, total: int, done_before: int = 0, enabled: bool = True, interval: float = 30.0,
                 desc: str = "job", unit: str = "records"):
        self.total, self.done, self.fresh = total, done_before, 0
        self.enabled, self.interval, self.unit = enabled, interval, unit
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done_before, unit=unit[:3], desc=desc, file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, records: int) -> None:
        self.done += records
        self.fresh += records
        if self.bar is not None:
            self.bar.update(records)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._log()

    def untimed(self, records: int) -> None:
        """Count `records` as done but start the rate's clock after them (a first training step that
        traced the graph says nothing about the rate to come)."""
        self.done += records
        self.start = time.monotonic()
        if self.bar is not None:
            self.bar.update(records)

    def _log(self) -> None:
        self.last_line = time.monotonic()
        runtime.LOG.info(progress_line(self.done, self.total, self.fresh, self.last_line - self.start, self.unit))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled:
            self._log()
