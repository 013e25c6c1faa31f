"""/metrics in Prometheus text: queue depth, batch sizes, request latency, generated tokens and
tokens/s, per-rank liveness (seconds since each rank's last heartbeat, and up/down)."""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TOKENS_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("hvdinfer_queue_depth", "Texts and sequences accepted, not yet on a rank", registry=r)
        self.active = Gauge("hvdinfer_active_sequences", "Sequences being decoded on the ranks", registry=r)
        self.batch_size = Histogram("hvdinfer_batch_size", "Texts per batch sent to a rank", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.latency = Histogram("hvdinfer_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.requests = Counter("hvdinfer_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.generated = Counter("hvdinfer_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge("hvdinfer_tokens_per_second", f"Tokens generated per second over the last "
                                  f"{TOKENS_WINDOW_S:g} s", registry=r)
        self.rank_age = Gauge("hvdinfer_rank_heartbeat_age_seconds", "Seconds since the rank was last heard",
                              ["rank"], registry=r)
        self.rank_up = Gauge("hvdinfer_rank_up", "1 while the rank is heard and has loaded the model", ["rank"],
                             registry=r)
        self._window: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_s.set_function(self._rate)

    def tokens(self, count: int) -> None:
        self.generated.inc(count)
        with self._lock:
            self._window.append((time.monotonic(), count))

    def sequences_done(self) -> None:
        pass

    def _rate(self) -> float:
        cutoff = time.monotonic() - TOKENS_WINDOW_S
        with self._lock:
            while self._window and self._window[0][0] < cutoff:
                self._window.popleft()
            return sum(c for _, c in self._window) / TOKENS_WINDOW_S

    def render(self, depth: int, active: int, ranks: Callable[[], dict[int, tuple[float, bool]]]) -> bytes:
        self.queue_depth.set(depth)
        self.active.set(active)
        for rank, (age, up) in ranks().items():
            self.rank_age.labels(str(rank)).set(age)
            self.rank_up.labels(str(rank)).set(1 if up else 0)
        return generate_latest(self.registry)
