"""Run a chunked job over all ranks: the coordinator hands out chunks and journals results.

Every rank calls `run_chunks` with the same `ChunkTask`. The coordinator (rank 0)

- computes chunks like every other rank, on its main thread;
- runs a dispatcher thread that keeps every worker supplied (`Schedule`), sends each chunk with its
  payload (for text input: the chunk's raw bytes, so only the coordinator reads the input and the
  other hosts need no copy of it), and receives the results;
- runs a writer thread that puts each finished chunk into the journal and counts progress.

A worker receives chunks, prepares the next one on a helper thread (parse, tokenise, batch) while
the current one computes, and sends each result back. When every chunk is journaled the
coordinator tells each worker there is nothing more; the task then assembles its output and calls
`finish`, which gives every rank the job's summary, so all ranks end together.

Test knobs: HVDINFER_TEST_SLOW_RANK=R:F makes rank R take F times as long per chunk (it sleeps
(F-1) x its compute time after each chunk), to show what dynamic allocation buys;
HVDINFER_TEST_CHUNK_SECONDS=S makes every chunk take at least S seconds, so tests can stop or kill
a job in its middle.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from typing import Any, Callable, Protocol

from hvdinfer.engine import link as link_mod
from hvdinfer.engine import watchdog
from hvdinfer.engine.journal import ChunkResult
from hvdinfer.engine.progress import Progress
from hvdinfer.engine.schedule import Schedule

WRITE_QUEUE = 8  # finished chunks waiting for the disk; beyond it the dispatcher waits (bounded memory)


class ChunkTask(Protocol):
    """What a task tells the engine. A chunk's result must be a pure function of its records."""

    def payload(self, chunk_id: int) -> Any:
        """Coordinator: what travels with the chunk (e.g. its input bytes), or None."""

    def prepare(self, chunk_id: int, payload: Any) -> Any:
        """Any rank, helper thread: parse, tokenise, batch."""

    def compute(self, prepared: Any) -> ChunkResult:
        """Any rank, main thread: run the model."""


def slow_factor(rank: int, env: dict | None = None) -> float:
    """F from HVDINFER_TEST_SLOW_RANK=R:F when this is rank R, else 1."""
    spec = (env if env is not None else os.environ).get("HVDINFER_TEST_SLOW_RANK", "")
    if not spec:
        return 1.0
    try:
        slow_rank, factor = spec.split(":")
        return float(factor) if int(slow_rank) == rank else 1.0
    except ValueError:
        raise ValueError(f"HVDINFER_TEST_SLOW_RANK={spec!r}: expected RANK:FACTOR, e.g. 1:2.0") from None


class _Computer:
    """One rank's chunk pipeline: prepare ahead on a helper thread, compute in order on the main one."""

    def __init__(self, task: ChunkTask, rank: int):
        self.task = task
        self.slow = slow_factor(rank)
        self.min_seconds = float(os.environ.get("HVDINFER_TEST_CHUNK_SECONDS", "0"))
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hvdinfer-prepare")
        self.pending: queue.Queue = queue.Queue()

    def add(self, chunk_id: int, payload: Any) -> None:
        self.pending.put((chunk_id, self.pool.submit(self.task.prepare, chunk_id, payload)))

    def compute(self, chunk_id: int, future: concurrent.futures.Future) -> ChunkResult:
        watchdog.beat(f"preparing chunk {chunk_id}")
        prepared = future.result()
        watchdog.beat(f"computing chunk {chunk_id}")
        start = time.perf_counter()
        result = self.task.compute(prepared)
        took = time.perf_counter() - start
        time.sleep(max((self.slow - 1) * took, self.min_seconds - took, 0.0))
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Coordinator:
    def __init__(self, task: ChunkTask, todo: list[int], journal, link, size: int, schedule: str,
                 progress: Progress):
        self.task, self.journal, self.link, self.size, self.progress = task, journal, link, size, progress
        self.schedule = Schedule(todo, size, schedule)
        self.todo = set(todo)
        self.lock = threading.Lock()
        self.in_hand = [0] * size
        self.told_done = [False] * size
        self.finished: set[int] = set()
        self.failure: BaseException | None = None
        self.writes: queue.Queue = queue.Queue(WRITE_QUEUE)
        self.sends: list = []
        self.threads = [threading.Thread(target=self._guard, args=(self._write,), name="hvdinfer-journal",
                                         daemon=True)]
        if size > 1:
            self.threads.append(threading.Thread(target=self._guard, args=(self._dispatch,),
                                                 name="hvdinfer-dispatch", daemon=True))

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which ends the job
            self.failure = self.failure or exc

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _put(self, item) -> None:
        """Hand a result to the writer; if the writer died, raise its error instead of waiting forever."""
        while True:
            try:
                self.writes.put(item, timeout=0.5)
                return
            except queue.Full:
                self._check()

    def all_written(self) -> bool:
        with self.lock:
            return self.finished >= self.todo

    # --- dispatcher thread: workers' chunks out, their results in --------------------------------
    def _dispatch(self) -> None:
        pause = link_mod.POLL_START_S
        while not self.all_written() or not all(self.told_done[1:]) or self.sends:
            busy = self._receive_results() | self._top_up_workers()
            self.sends = [req for req in self.sends if not req.test()[0]]
            pause = link_mod.POLL_START_S if busy else min(link_mod.POLL_MAX_S, pause * 2)
            if self.failure is not None:
                return
            time.sleep(pause)

    def _receive_results(self) -> bool:
        got_any = False
        while (got := self.link.poll(link_mod.RESULT)) is not None:
            source, (chunk_id, result) = got
            with self.lock:
                self.in_hand[source] -= 1
            self._put((chunk_id, result))
            got_any = True
        return got_any

    def _top_up_workers(self) -> bool:
        sent = False
        for rank in range(1, self.size):
            while True:
                with self.lock:
                    chunk_id = self.schedule.next_for(rank, self.in_hand[rank])
                    if chunk_id is None:
                        done = self.schedule.exhausted_for(rank) and self.in_hand[rank] == 0
                        break
                    self.in_hand[rank] += 1
                self._send(rank, (chunk_id, self.task.payload(chunk_id)))
                sent = True
            if done and not self.told_done[rank]:
                self._send(rank, None)
                self.told_done[rank] = True
        return sent

    def _send(self, rank: int, message) -> None:
        # Non-blocking: a worker busy computing must not hold up the others' results.
        self.sends = [req for req in self.sends if not req.test()[0]]
        self.sends.append(self.link.comm.isend(message, dest=rank, tag=link_mod.ASSIGN))

    # --- writer thread: results into the journal ---------------------------------------------
    def _write(self) -> None:
        while True:
            item = self.writes.get()
            if item is None:
                return
            chunk_id, result = item
            self.journal.put(chunk_id, result)
            with self.lock:
                self.finished.add(chunk_id)
            self.progress.update(result.records)

    def flush(self, seconds: float = 10.0) -> None:
        """Last words on a stall: let the writer journal what it already holds."""
        deadline = time.monotonic() + seconds
        while not self.writes.empty() and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- main thread: compute like everyone else, then wait for the rest -----------------------
    def run(self) -> None:
        for thread in self.threads:
            thread.start()
        computer = _Computer(self.task, 0)
        held = 0
        try:
            while True:
                self._check()
                with self.lock:
                    while (chunk_id := self.schedule.next_for(0, held)) is not None:
                        computer.add(chunk_id, self.task.payload(chunk_id))
                        held += 1
                if not held:
                    break
                chunk_id, future = computer.pending.get()
                self._put((chunk_id, computer.compute(chunk_id, future)))
                held -= 1
            while not self.all_written() or not all(self.told_done[1:]):
                self._check()
                watchdog.beat(f"waiting for {len(self.todo - self.finished)} chunk(s) from other ranks")
                time.sleep(0.02)
        finally:
            computer.close()
            self.writes.put(None)
            for thread in self.threads:
                thread.join(timeout=60)
        self._check()


def run_chunks(task: ChunkTask, link: link_mod.Link | None, rank: int, size: int, schedule: str,
               todo: list[int] | None = None, journal=None, progress: Progress | None = None) -> None:
    """Compute every chunk in `todo` once, over all ranks; on the coordinator each result ends in
    `journal`. `todo`, `journal` and `progress` are the coordinator's; workers pass None."""
    if rank == 0:
        coordinator = _Coordinator(task, list(todo), journal, link, size, schedule,
                                   progress or Progress(0, enabled=False))
        dog = watchdog.current()
        if dog is not None:
            dog.on_stall(coordinator.flush)
        coordinator.run()
    else:
        _run_worker(task, link, rank)


def _run_worker(task: ChunkTask, link: link_mod.Link, rank: int) -> None:
    """Receive on a helper thread (so the next chunk is prepared while this one computes), compute
    here, send each result back, until the coordinator says there is no more work."""
    computer = _Computer(task, rank)
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            while (message := link.wait(link_mod.ASSIGN, 0)[1]) is not None:
                computer.add(*message)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        computer.pending.put(None)

    receiver = threading.Thread(target=receive, name="hvdinfer-receive", daemon=True)
    receiver.start()
    try:
        while True:
            watchdog.beat("waiting for work from rank 0")
            try:
                item = computer.pending.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                break
            chunk_id, result = item[0], computer.compute(*item)
            watchdog.beat(f"sending chunk {chunk_id} to rank 0")
            link.send((chunk_id, result), 0, link_mod.RESULT)
    finally:
        computer.close()
    receiver.join()
    if failure:
        raise failure[0]


def finish(link: link_mod.Link | None, rank: int, size: int, summary: dict | None) -> dict:
    """The coordinator's `summary` (or any result) on every rank, once its output is written; ranks
    end together."""
    if size == 1 or link is None:
        return summary or {}
    if rank == 0:
        for worker in range(1, size):
            link.send(summary, worker, link_mod.FINISH)
        return summary
    return link.wait(link_mod.FINISH, 0, lambda: watchdog.beat("waiting for rank 0 to write the output"))[1]
