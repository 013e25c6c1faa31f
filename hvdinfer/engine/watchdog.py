"""The stuck-rank watchdog: heartbeats between every rank and the coordinator.

A rank can stop making progress while staying alive: SIGSTOP, blocked I/O, a deadlock, a network
partition. Horovod's own stall check cannot see the first kind (its background thread is frozen
with the rest of the process) and takes minutes for the others, so a job would hang. Here every
rank runs one daemon thread that, every `interval` seconds,

- on a worker: sends the coordinator a heartbeat saying what its main thread last did and how long
  ago, and watches for the coordinator's heartbeats;
- on the coordinator: collects the workers' heartbeats and sends its own to each of them.

A rank is stuck when no heartbeat of it arrived for `timeout` seconds (the whole process is frozen
or unreachable), or when its main thread has not called `beat` for `timeout` seconds while armed
(alive but stuck). The rank that sees it prints one line naming the stuck rank and what it last
did, runs the registered last-words hooks (the journal flushes what it holds) and exits with
EXIT_STALLED, which makes mpirun/horovodrun end every rank. Workers that lose the coordinator wait
a little longer the higher their rank, so one line, not N, reports it.

Phases with no natural beat (fetching a model, tracing it) run under `quiet(...)`: the heartbeat
thread still proves the process alive, but the main thread's silence is not judged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator

from hvdinfer import runtime
from hvdinfer.engine import link as link_mod

EXIT_STALLED = 3
DEFAULT_TIMEOUT_S = 60.0
REPORT_GRACE_S = 2.0  # extra wait per worker rank before it reports a lost coordinator


@dataclasses.dataclass
class Pulse:
    """What one rank's main thread last said about itself."""

    activity: str = "starting"
    beat_at: float = dataclasses.field(default_factory=time.monotonic)
    armed: bool = True


@dataclasses.dataclass
class PeerView:
    """The coordinator's (or a worker's) latest news of one peer."""

    heard_at: float
    activity: str = "starting"
    idle_s: float = 0.0
    armed: bool = True
    host: str = "?"
    pid: int = 0


def stall_line(rank: int, size: int, view: PeerView, now: float, timeout: float, silent_only: bool = False,
               progress_grace: float = 0.0) -> str | None:
    """The one-line report if `view` shows a stuck rank, else None (pure: unit-tested).

    A silent rank (no heartbeat) is judged at `timeout`; a live rank without progress only after
    `progress_grace` more, because a rank waiting in a collective on a frozen peer makes no progress
    either, and the report must name the frozen one (whose silence shows up to one heartbeat late).
    """
    silent = now - view.heard_at
    where = f"rank {rank} of {size} (host {view.host}, pid {view.pid})"
    if silent > timeout:
        return (f"hvdinfer: {where} is stuck: no heartbeat for {silent:.0f} s (--stall-timeout {timeout:g}); "
                f"it last reported '{view.activity}' {silent + view.idle_s:.0f} s ago")
    idle = view.idle_s + silent
    if not silent_only and view.armed and idle > timeout + progress_grace:
        return (f"hvdinfer: {where} is stuck: alive but no progress for {idle:.0f} s (--stall-timeout {timeout:g}); "
                f"it last reported '{view.activity}'")
    return None


class Watchdog:
    """One per rank; `beat` from the main thread, everything else runs on its own thread."""

    def __init__(self, link: link_mod.Link | None, rank: int, size: int, timeout: float = DEFAULT_TIMEOUT_S,
                 interval: float | None = None, exit_fn: Callable[[int], None] | None = None):
        if timeout <= 0:
            raise ValueError(f"stall timeout must be > 0 seconds, got {timeout}")
        self.link, self.rank, self.size, self.timeout = link, rank, size, float(timeout)
        self.interval = interval or min(1.0, self.timeout / 10)
        self.pulse = Pulse()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_words: list[Callable[[], None]] = []
        self._exit = exit_fn or runtime.end_process
        self._pending = None
        now = time.monotonic()
        others = range(size) if rank == 0 else [0]
        # Without a link (one rank, or no MPI) a rank can only judge itself.
        self.peers = {r: PeerView(now) for r in others if r != rank} if link is not None else {}
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._exchanged_at = now
        self.departed: set[int] = set()  # peers that said goodbye: their silence is no stall
        # Two threads: heartbeats go through MPI, which could itself block; the judge does no MPI,
        # so a blocked exchange is still seen (and reported) instead of silencing the watchdog.
        self._threads = [threading.Thread(target=self._run_exchange, name="hvdinfer-heartbeat", daemon=True),
                         threading.Thread(target=self._run_judge, name="hvdinfer-watchdog", daemon=True)]

    # --- main thread --------------------------------------------------------------------------
    def beat(self, activity: str, armed: bool | None = None) -> None:
        """The main thread made progress; `activity` is what it is about to do. `armed=False` starts
        a quiet phase (see `quiet`), `armed=True` ends one; None keeps the current state."""
        self.pulse = Pulse(activity, time.monotonic(), self.pulse.armed if armed is None else armed)

    @contextlib.contextmanager
    def quiet(self, activity: str) -> Iterator[None]:
        """A phase with no beats of its own (model fetch, first trace): only liveness is judged."""
        previous = self.pulse
        self.pulse = Pulse(activity, time.monotonic(), armed=False)
        try:
            yield
        finally:
            self.pulse = Pulse(previous.activity, time.monotonic(), previous.armed)

    def on_stall(self, hook: Callable[[], None]) -> None:
        """Run `hook` (briefly) before a stall ends this rank, e.g. to flush finished work to disk."""
        self._last_words.append(hook)

    def start(self) -> "Watchdog":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and tell the peers this rank is leaving, so its silence is not a stall
        (ranks do not always end together: a worker may exit while the coordinator still writes)."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)
        if self.peers and not self._departed_all():
            goodbyes = [self.link.comm.isend({**self._heartbeat(), "leaving": True}, dest=t, tag=link_mod.HEARTBEAT)
                        for t in self._targets()]
            deadline = time.monotonic() + 1.0
            while not all(req.test()[0] for req in goodbyes) and time.monotonic() < deadline:
                time.sleep(0.01)

    def _targets(self) -> list[int]:
        return sorted(self.peers) if self.rank == 0 else [0]

    def _departed_all(self) -> bool:
        return set(self.peers) <= self.departed

    # --- watchdog threads ---------------------------------------------------------------------
    def _run_exchange(self) -> None:
        while self.peers and not self._stop.wait(self.interval):
            self._exchange(time.monotonic())
            self._exchanged_at = time.monotonic()

    def _run_judge(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last > 3 * self.interval:
                self._thaw(now - last)
            last = now
            blocked = now - self._exchanged_at
            if self.peers and blocked > self.timeout:
                self._end_job(f"hvdinfer: rank {self.rank} of {self.size} (host {self.me['host']}, pid "
                              f"{self.me['pid']}): its heartbeat exchange has been blocked in MPI for {blocked:.0f} s "
                              f"(--stall-timeout {self.timeout:g}); its main thread last reported '{self.pulse.activity}'")
            else:
                self._judge(now)

    def _thaw(self, gap: float) -> None:
        """This whole process was frozen for `gap` seconds (SIGSTOP, a suspended VM): nothing could
        be heard or done meanwhile, so the clocks of this rank's judgement restart from now."""
        self._exchanged_at += gap
        self.pulse = dataclasses.replace(self.pulse, beat_at=self.pulse.beat_at + gap)
        for view in self.peers.values():
            view.heard_at += gap

    def _heartbeat(self) -> dict:
        pulse = self.pulse
        return {"activity": pulse.activity, "idle_s": time.monotonic() - pulse.beat_at, "armed": pulse.armed, **self.me}

    def _exchange(self, now: float) -> None:
        while (got := self.link.poll(link_mod.HEARTBEAT)) is not None:
            source, news = got
            if news.get("leaving"):
                self.departed.add(source)
            elif source in self.peers:
                self.peers[source] = PeerView(now, news["activity"], news["idle_s"], news["armed"], news["host"],
                                              news["pid"])
        targets = [t for t in self._targets() if t not in self.departed]
        # One heartbeat in flight per peer at most: a frozen peer must not make this thread block.
        if self._pending is not None and not all(req.test()[0] for req in self._pending):
            return
        self._pending = [self.link.comm.isend(self._heartbeat(), dest=t, tag=link_mod.HEARTBEAT) for t in targets]

    def _judge(self, now: float) -> None:
        # The coordinator judges every rank, itself included; a worker judges only the coordinator's
        # silence (its own, and the coordinator's lack of progress, are the coordinator's to report),
        # so one rank reports a stall. Silence is judged first: it names the root cause.
        if self.rank == 0 or not self.peers:
            mine = PeerView(now, self.pulse.activity, now - self.pulse.beat_at, self.pulse.armed, **self.me)
            views = [(self.rank, mine, now)] + [(r, view, now) for r, view in sorted(self.peers.items())
                                                if r not in self.departed]
        elif 0 in self.departed:
            return
        else:
            views = [(0, self.peers[0], now - REPORT_GRACE_S * (self.rank - 1))]
        grace = 2 * self.interval
        for silent_only in (True, False):
            for r, view, at in views:
                only = silent_only or r != self.rank and self.rank != 0
                line = stall_line(r, self.size, view, at, self.timeout, only, grace)
                if line:
                    self._end_job(line)
                    return

    def _end_job(self, line: str) -> None:
        print(line + "; ending the job", file=sys.stderr, flush=True)
        for hook in self._last_words:
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - last words must not stop the exit
                print(f"hvdinfer: rank {self.rank}: while ending the job: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self._exit(EXIT_STALLED)


_WATCHDOG: Watchdog | None = None


def start(link: link_mod.Link | None, rank: int, size: int, timeout: float) -> Watchdog:
    """The rank's watchdog, started once; a second call returns the running one."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(link, rank, size, timeout).start()
    return _WATCHDOG


def current() -> Watchdog | None:
    return _WATCHDOG


def beat(activity: str, armed: bool | None = None) -> None:
    """Report progress to the running watchdog, if any (a no-op outside a job)."""
    if _WATCHDOG is not None:
        _WATCHDOG.beat(activity, armed)


@contextlib.contextmanager
def quiet(activity: str) -> Iterator[None]:
    if _WATCHDOG is None:
        yield
    else:
        with _WATCHDOG.quiet(activity):
            yield
