"""The loop every rank runs while the server is up, the coordinator's on its main thread and each
worker's on its own: take work from the router (texts to embed or classify, sequences to decode,
cancellations, stop), compute, send results back.

Messages to a rank:   ("texts", batch_id, task, texts) | ("generate", key, prompt_ids, params, index)
                      | ("cancel", key) | ("stop",)
Messages from a rank: ("ready", rank) | ("texts", batch_id, values, token_counts) | ("events", [Event...])
                      | ("failed", kind, id, message)   kind: "texts" or "generate"

Text batches come first (they are short and someone waits for each), then one decode iteration
over every active sequence: a sequence joins a free slot between two iterations and leaves the
iteration it finishes (`--batching continuous`, the default), or, with `--batching static`, a new
group is admitted only once the whole previous group has finished (the baseline the bench compares).

Test knob: HVDINFER_TEST_STEP_SECONDS=S makes every decode iteration take at least S seconds, so
tests can time a request out or freeze a rank in the middle of one.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable

from hvdinfer.engine import link as link_mod
from hvdinfer.engine import watchdog
from hvdinfer.tasks.serve.served import Served, TextForward

BATCHING = ("continuous", "static")
ADMIT_EVERY = 4


class RankLoop:
    def __init__(self, served: Served, rank: int, max_batch: int, batching: str,
                 receive: Callable[[], Any], send: Callable[[Any], None]):
        self.served, self.rank, self.receive, self.send = served, rank, receive, send
        self.batching = batching
        self.texts: collections.deque = collections.deque()
        self.waiting: collections.deque = collections.deque()
        self.stopping = False
        self.since_admit = 0
        self.admit_group = max(1, max_batch // 4)
        self.min_step_s = float(os.environ.get("HVDINFER_TEST_STEP_SECONDS", "0"))
        if served.kind == "generate":
            from models.slots import GPTSlots, SlotDecoder

            # Under --pp/--tp the parallelised model's slot cache (every rank of a group computes it).
            compute = served.runner.slot_cache(max_batch) if served.runner else GPTSlots(served.model, max_batch)
            self.forward, self.decoder = None, SlotDecoder(compute, served.tokenizer)
            self._warm_up()
        else:
            self.forward, self.decoder = TextForward(served, max_batch), None

    def _warm_up(self) -> None:
        """Trace prefill and step once, before the first request."""
        from models.decoding import SamplingParams

        self.decoder.admit([("warm-up", [0], SamplingParams(max_new_tokens=2, ignore_eos=True), 0)])
        self.decoder.step()

    def run(self) -> None:
        self.send(("ready", self.rank))
        pause = link_mod.POLL_START_S
        while True:
            got_any = self._take_messages()
            if self.stopping and not self.texts and not self.waiting and not (self.decoder and self.decoder.active):
                return
            if self.texts:
                self._compute_texts(*self.texts.popleft())
            elif self.decoder is not None and (self.waiting or self.decoder.active):
                self._decode_iteration()
            elif not got_any:
                watchdog.beat("serving: waiting for requests")
                time.sleep(pause)
                pause = min(link_mod.POLL_MAX_S, pause * 2)
                continue
            pause = link_mod.POLL_START_S

    def _take_messages(self) -> bool:
        got_any = False
        while (message := self.receive()) is not None:
            got_any = True
            kind = message[0]
            if kind == "texts":
                self.texts.append(message[1:])
            elif kind == "generate":
                self.waiting.append(message[1:])
            elif kind == "cancel":
                key = message[1]
                if not self.decoder.cancel(key):
                    self.waiting = collections.deque(w for w in self.waiting if w[0] != key)
            elif kind == "stop":
                self.stopping = True
        return got_any

    def _compute_texts(self, batch_id: int, task: str, texts: list[str]) -> None:
        watchdog.beat(f"serving: {task} batch {batch_id} of {len(texts)} text(s)")
        try:
            values, tokens = self.forward(task, texts)
        except Exception as exc:  # noqa: BLE001 - one bad batch fails its requests, not the server
            self.send(("failed", "texts", batch_id, f"{type(exc).__name__}: {exc}"))
            return
        self.send(("texts", batch_id, values, tokens))

    def _decode_iteration(self) -> None:
        from models.decoding import SamplingParams

        decoder = self.decoder
        watchdog.beat(f"serving: decoding {decoder.active} sequence(s), {len(self.waiting)} waiting")
        admit = []
        # Continuous: a prefill costs about one decode step, so newcomers join in groups (a quarter of
        # the slots free, or after ADMIT_EVERY iterations) rather than one prefill per iteration.
        self.since_admit += 1
        due = decoder.free >= self.admit_group or self.since_admit >= ADMIT_EVERY
        if not decoder.active or (self.batching == "continuous" and due):
            self.since_admit = 0
            while self.waiting and len(admit) < decoder.free:
                key, prompt, params, index = self.waiting.popleft()
                try:
                    sampling = SamplingParams(**params)
                    decoder.check(prompt, sampling)
                except (TypeError, ValueError) as exc:
                    self.send(("failed", "generate", key, str(exc)))
                    continue
                admit.append((key, prompt, sampling, index))
        start = time.monotonic()
        events = decoder.admit(admit)
        events += decoder.step() if decoder.active else []
        time.sleep(max(0.0, self.min_step_s - (time.monotonic() - start)))
        if events:
            self.send(("events", events))

