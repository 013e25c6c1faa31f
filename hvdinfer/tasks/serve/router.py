"""The coordinator's batcher and router: requests in from the HTTP thread, work out to every rank
over the engine link, results back to the waiting requests.

- Texts (embeddings, classification): each text waits in one queue; a batch leaves when it holds
  --max-batch texts or its oldest text has waited --max-wait-ms, to the rank with the fewest
  batches in hand (at most two each, so the next is there when one finishes). Its results go back
  to the requests its texts came from; a request is answered when all its texts are.
- Sequences (completions, chat): each goes to the rank with the fewest sequences, at most
  --max-batch per rank (its slots); the rank decodes them with iteration-level batching and sends
  every iteration's new tokens back, which stream to the request as they come.
- Cancellation (a client gone, a timeout) frees the sequence's slot on its rank at once.

Everything that touches the queues runs on one thread, the router's; the HTTP thread only puts
requests and cancellations in (thread-safe) and awaits asyncio futures and queues that the router
completes with `loop.call_soon_threadsafe`. Rank 0 computes too: its loop (ranks.py) runs on the
process's main thread and talks to the router through two in-process queues instead of the link.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import queue
import threading
import time

import numpy as np

from hvdinfer.engine import link as link_mod
from hvdinfer.tasks.serve.protocol import APIError

TEXT_BATCHES_IN_HAND = 2


def _complete(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value=None, error=None) -> None:
    def set_it():
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(value)
    loop.call_soon_threadsafe(set_it)


@dataclasses.dataclass(eq=False)
class TextRequest:
    task: str
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    values: list = dataclasses.field(default_factory=list)
    tokens: list = dataclasses.field(default_factory=list)
    remaining: int = 0
    failed: bool = False


@dataclasses.dataclass(eq=False)
class Sequence:
    key: int
    prompt: list[int]
    params: dict
    index: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    """models.slots.Event objects, then None when finished; an APIError if it failed."""
    rank: int = -1


class Router:
    def __init__(self, link, size: int, max_batch: int, max_wait_s: float, max_queue: int, metrics=None):
        self.link, self.size, self.max_batch, self.max_wait_s = link, size, max_batch, max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.lock = threading.Lock()
        self.incoming: collections.deque = collections.deque()  # (kind, object) from the HTTP thread
        self.pending_texts: collections.deque = collections.deque()  # (request, position, text, arrived)
        self.pending_sequences: collections.deque = collections.deque()
        self.batches: dict[int, tuple[int, list]] = {}  # batch id -> (rank, [(request, position)])
        self.sequences: dict[int, Sequence] = {}  # key -> placed sequence
        self.texts_in_hand = [0] * size
        self.sequences_on = [0] * size
        self.ready: set[int] = set()
        self.queued = 0  # texts + sequences accepted and not yet sent to a rank
        self.ids = itertools.count(1)
        self.to_rank0: queue.Queue = queue.Queue()
        self.from_rank0: queue.Queue = queue.Queue()
        self.sends: list = []
        self.failure: APIError | None = None
        self.draining = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hvdinfer-router", daemon=True)

    # --- the HTTP thread's side ------------------------------------------------------------------
    def _admit(self, count: int) -> None:
        if self.failure is not None:
            raise self.failure
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if self.queued + count > self.max_queue:
            raise APIError(429, f"the queue is full ({self.max_queue} waiting); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self.queued += count

    def submit_texts(self, task: str, texts: list[str]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        request = TextRequest(task, texts, loop, loop.create_future(), [None] * len(texts), [0] * len(texts),
                              len(texts))
        with self.lock:
            self._admit(len(texts))
            now = time.monotonic()
            self.incoming.extend(("text", (request, i, t, now)) for i, t in enumerate(texts))
        return request.future

    def submit_sequence(self, prompt: list[int], params: dict, index: int) -> Sequence:
        loop = asyncio.get_running_loop()
        sequence = Sequence(next(self.ids), prompt, params, index, loop, asyncio.Queue())
        with self.lock:
            self._admit(1)
            self.incoming.append(("sequence", sequence))
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        with self.lock:
            self.incoming.append(("cancel", sequence))

    def depth(self) -> int:
        return self.queued

    def active_sequences(self) -> int:
        return sum(self.sequences_on)

    # --- rank 0's side -------------------------------------------------------------------------
    def rank0_receive(self):
        try:
            return self.to_rank0.get_nowait()
        except queue.Empty:
            return None

    def rank0_send(self, message) -> None:
        self.from_rank0.put(message)

    # --- ending -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Accept nothing new; the router stops every rank once all accepted work is answered."""
        with self.lock:
            self.draining = True

    def fail_all(self, error: APIError) -> None:
        """Answer every waiting request with `error` (a rank failed: the job is ending)."""
        with self.lock:
            self.failure = error
            requests = {id(r): r for r, *_ in self.pending_texts}
            for _, items in self.batches.values():
                requests.update({id(r): r for r, _ in items})
            for kind, item in self.incoming:
                if kind == "text":
                    requests[id(item[0])] = item[0]
            sequences = list(self.sequences.values()) + list(self.pending_sequences) + [
                item for kind, item in self.incoming if kind == "sequence"]
        for request in requests.values():
            _complete(request.loop, request.future, error=error)
        for sequence in sequences:
            sequence.loop.call_soon_threadsafe(sequence.events.put_nowait, error)

    # --- the router thread -------------------------------------------------------------------
    def start(self) -> "Router":
        self.thread.start()
        return self

    def _run(self) -> None:
        pause = link_mod.POLL_START_S
        while True:
            busy = self._take_incoming() | self._receive() | self._place_sequences() | self._send_text_batches()
            self.sends = [req for req in self.sends if not req.test()[0]]
            if self.draining and self._idle():
                for rank in range(self.size):
                    self._send(rank, ("stop",))
                while self.sends:
                    self.sends = [req for req in self.sends if not req.test()[0]]
                    time.sleep(0.001)
                self.stopped.set()
                return
            pause = link_mod.POLL_START_S if busy else min(link_mod.POLL_MAX_S / 5, pause * 2)
            time.sleep(pause)

    def _idle(self) -> bool:
        with self.lock:
            return not (self.incoming or self.pending_texts or self.pending_sequences or self.batches
                        or self.sequences)

    def _send(self, rank: int, message) -> None:
        if rank == 0:
            self.to_rank0.put(message)
        else:
            self.sends.append(self.link.comm.isend(message, dest=rank, tag=link_mod.ASSIGN))

    def _take_incoming(self) -> bool:
        with self.lock:
            items, self.incoming = self.incoming, collections.deque()
        for kind, item in items:
            if kind == "text":
                self.pending_texts.append(item)
            elif kind == "sequence":
                self.pending_sequences.append(item)
            else:
                self._cancel(item)
        return bool(items)

    def _cancel(self, sequence: Sequence) -> None:
        if sequence in self.pending_sequences:
            self.pending_sequences.remove(sequence)
            with self.lock:
                self.queued -= 1
        elif self.sequences.pop(sequence.key, None) is not None:
            self.sequences_on[sequence.rank] -= 1
            self._send(sequence.rank, ("cancel", sequence.key))

    def _least_loaded(self, load: list[int], limit: int) -> int | None:
        # Ties go to workers: rank 0 also runs the HTTP server.
        ranks = [r for r in sorted(self.ready) if load[r] < limit]
        return min(ranks, key=lambda r: (load[r], r == 0)) if ranks else None

    def _place_sequences(self) -> bool:
        placed = False
        while self.pending_sequences:
            rank = self._least_loaded(self.sequences_on, self.max_batch)
            if rank is None:
                break
            sequence = self.pending_sequences.popleft()
            sequence.rank = rank
            self.sequences[sequence.key] = sequence
            self.sequences_on[rank] += 1
            with self.lock:
                self.queued -= 1
            self._send(rank, ("generate", sequence.key, sequence.prompt, sequence.params, sequence.index))
            placed = True
        return placed

    def _send_text_batches(self) -> bool:
        sent = False
        while self.pending_texts:
            full = len(self.pending_texts) >= self.max_batch
            waited = time.monotonic() - self.pending_texts[0][3] >= self.max_wait_s
            if not (full or waited or self.draining):
                break
            rank = self._least_loaded(self.texts_in_hand, TEXT_BATCHES_IN_HAND)
            if rank is None:
                break
            items = [self.pending_texts.popleft() for _ in range(min(self.max_batch, len(self.pending_texts)))]
            batch_id = next(self.ids)
            self.batches[batch_id] = (rank, [(request, position) for request, position, _, _ in items])
            self.texts_in_hand[rank] += 1
            with self.lock:
                self.queued -= len(items)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(items))
            self._send(rank, ("texts", batch_id, items[0][0].task, [text for _, _, text, _ in items]))
            sent = True
        return sent

    def _receive(self) -> bool:
        got_any = False
        while True:
            try:
                source, message = 0, self.from_rank0.get_nowait()
            except queue.Empty:
                got = self.link.poll(link_mod.RESULT) if self.link is not None else None
                if got is None:
                    return got_any
                source, message = got
            got_any = True
            self._handle(source, message)

    def _handle(self, source: int, message) -> None:
        kind = message[0]
        if kind == "ready":
            self.ready.add(source)
        elif kind == "texts":
            _, batch_id, values, tokens = message
            rank, items = self.batches.pop(batch_id)
            self.texts_in_hand[rank] -= 1
            for row, (request, position) in enumerate(items):
                request.values[position], request.tokens[position] = values[row], tokens[row]
                request.remaining -= 1
                if request.remaining == 0 and not request.failed:
                    _complete(request.loop, request.future, (np.stack(request.values), request.tokens))
        elif kind == "events":
            for event in message[1]:
                sequence = self.sequences.get(event.key)
                if sequence is None:
                    continue  # cancelled meanwhile
                sequence.loop.call_soon_threadsafe(sequence.events.put_nowait, event)
                if event.finish_reason is not None:
                    del self.sequences[event.key]
                    self.sequences_on[sequence.rank] -= 1
                    if self.metrics is not None:
                        self.metrics.sequences_done()
            if self.metrics is not None:
                self.metrics.tokens(sum(len(e.tokens) for e in message[1]))
        elif kind == "failed":
            _, what, ident, text = message
            if what == "texts":
                rank, items = self.batches.pop(ident)
                self.texts_in_hand[rank] -= 1
                for request, _ in items:
                    request.failed = True
                    _complete(request.loop, request.future, error=APIError(500, text, "server_error"))
            else:
                sequence = self.sequences.pop(ident, None)
                if sequence is not None:
                    self.sequences_on[sequence.rank] -= 1
                    sequence.loop.call_soon_threadsafe(sequence.events.put_nowait, APIError(400, text))
