"""Start the server over all ranks, keep it healthy, end it.

- Start: every rank loads the model and traces it (under the watchdog's quiet phase); the
  coordinator starts the router thread and uvicorn on its own thread and event loop, then runs its
  own rank loop on the main thread like every worker. Under --tp a group of ranks is one rank to the
  router: its leader runs the rank loop over the leaders' link, the others repeat its forwards (and a
  decoder's prefills and steps).
- Faults: the job engine's watchdog applies. A rank that dies or freezes is named by the
  coordinator's watchdog within --stall-timeout; before the job ends (exit code 3) every waiting
  request is answered 503, so none hangs. /healthz is 503 as soon as a rank is not heard.
- Shutdown: SIGTERM or SIGINT on the coordinator stops accepting connections, lets in-flight
  requests finish (up to --shutdown-timeout), then stops every rank; all exit 0. Workers ignore
  these signals (mpirun forwards them to every rank): the coordinator ends them in order. mpirun
  itself SIGKILLs every rank 1 s after forwarding a signal, so signal the coordinator's pid (logged
  at start) or raise OMPI_MCA_odls_base_sigkill_timeout above --shutdown-timeout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time

from hvdinfer import collect, runtime
from hvdinfer.engine import job, runner, watchdog
from hvdinfer.parallel.dims import ParallelConfig
from hvdinfer.runtime import JobError
from hvdinfer.tasks.serve import ranks as ranks_mod
from hvdinfer.tasks.serve.protocol import APIError
from hvdinfer.tasks.serve.served import load

LOG = runtime.LOG


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """One `hvdinfer serve` job."""

    model: str
    """A model id (minilm-l6), a sentence-embedder or classifier directory, or a GPT-2-layout directory."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port."""
    max_batch: int = 32
    """Texts per batch sent to a rank; sequences decoded together per rank (its slots)."""
    max_wait_ms: float = 5.0
    """How long a text waits for others to fill its batch."""
    api_key: str | None = None
    """When set, every /v1 request needs `Authorization: Bearer KEY`."""
    max_queue: int = 4096
    """Texts and sequences waiting for a rank at most; beyond it requests get 429."""
    request_timeout: float = 120.0
    """Seconds a request may take before it gets 504 (and its sequence is cancelled)."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones get 413."""
    batching: str = "continuous"
    """continuous: sequences join and leave every decode iteration; static: a group at a time."""
    precision: str = "auto"
    """auto, fp32 or bf16 compute."""
    stall_timeout: float = watchdog.DEFAULT_TIMEOUT_S
    """End the job when a rank makes no progress for this many seconds."""
    shutdown_timeout: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """--pp/--tp as in infer and generate: each tensor-parallel group serves as one rank."""

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise JobError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms",):
            if getattr(self, name) < 0:
                raise JobError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("request_timeout", "stall_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise JobError(f"--{name.replace('_', '-')} must be > 0 seconds")
        if self.batching not in ranks_mod.BATCHING:
            raise JobError(f"--batching must be one of {', '.join(ranks_mod.BATCHING)}")
        if self.api_key is not None and not self.api_key:
            raise JobError("--api-key must not be empty")


def run(cfg: ServeConfig, runtime_config: runtime.RuntimeConfig | None = None) -> dict:
    engine = job.start(runtime_config, cfg.stall_timeout)
    rt = engine.rt
    precision, _ = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    if not cfg.parallel.forward_uses_horovod:
        runtime.release_horovod()  # the last collective: from here on the ranks talk over the link
    with watchdog.quiet("loading and tracing the model"):
        served = load(cfg.model, precision, cfg.parallel)
    if not rt.is_coordinator:
        # mpirun forwards SIGTERM/SIGINT to every rank; the coordinator decides when this rank stops.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = served.group
    if group is not None and not group.is_leader:
        served.runner.follow()  # repeat the group leader's forwards until it stops serving
        return runner.finish(engine.link, rt.rank, rt.size, None)
    # The router and the rank loops speak over the groups' leaders' link under --tp: a group is one rank.
    link, rank, size = (group.leaders, group.dp_rank, group.dims.dp) if group else (engine.link, rt.rank, rt.size)
    # A group's leader traces inside leading(), so the others trace with it (a decoder's slot cache).
    with served.runner.leading() if group else contextlib.nullcontext():
        with watchdog.quiet("tracing the model"):
            if rt.is_coordinator:
                from hvdinfer.tasks.serve.metrics import Metrics
                from hvdinfer.tasks.serve.router import Router

                metrics = Metrics()
                router = Router(link, size, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, metrics)
                loop = ranks_mod.RankLoop(served, 0, cfg.max_batch, cfg.batching, router.rank0_receive,
                                          router.rank0_send)
            else:
                loop = ranks_mod.RankLoop(served, rank, cfg.max_batch, cfg.batching, *_worker_link(link))
        if not rt.is_coordinator:
            loop.run()
            summary = None
        else:
            summary = _serve(cfg, engine, served, router, metrics, loop, group.dims.tp if group else 1)
    return runner.finish(engine.link, rt.rank, rt.size, summary)


def _worker_link(link):
    from hvdinfer.engine import link as link_mod

    def receive():
        got = link.poll(link_mod.ASSIGN, 0)
        return None if got is None else got[1]

    return receive, lambda message: link.send(message, 0, link_mod.RESULT)


def _serve(cfg: ServeConfig, engine, served, router, metrics, loop, tp: int) -> dict:
    import uvicorn

    from hvdinfer.tasks.serve.app import ServerState, create_app

    rt, dog = engine.rt, engine.watchdog
    started = time.monotonic()

    def ranks() -> dict[int, tuple[float, bool]]:
        now = time.monotonic()
        seen = {0: (0.0, 0 in router.ready)}
        for rank, view in dog.peers.items():
            age = now - view.heard_at
            # Under --tp the router knows groups (rank // tp); a rank is up when its group is ready and it is heard.
            seen[rank] = (age, rank // tp in router.ready and age < max(3 * dog.interval, 2.0))
        return seen

    def health() -> tuple[bool, dict]:
        status = ranks()
        ok = all(up for _, up in status.values()) and router.failure is None and not router.draining
        return ok, {"ranks": rt.size, "ready": sorted(router.ready), "model": served.name,
                    "down": [r for r, (_, up) in status.items() if not up]}

    state = ServerState(name=served.name, names=served.names(), kind=served.kind, endpoints=served.endpoints(),
                        context=served.context, labels=served.labels,
                        tokenizer=served.tokenizer if served.kind == "generate" else None, router=router,
                        metrics=metrics, health=health, ranks=ranks, api_key=cfg.api_key or os.environ.get(
                            "HVDINFER_API_KEY") or None, max_body_bytes=cfg.max_body_bytes,
                        request_timeout_s=cfg.request_timeout)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=cfg.shutdown_timeout,
                                           timeout_keep_alive=30, backlog=2048))

    def on_stall() -> None:
        # Last words before the watchdog ends the job: every waiting request gets its answer.
        router.fail_all(APIError(503, "a rank of the serving job failed; the job is ending", "service_unavailable"))
        time.sleep(1.0)

    dog.on_stall(on_stall)

    def http() -> None:
        try:
            server.run()
        finally:
            router.drain()  # uvicorn has finished the in-flight requests: stop the ranks once idle

    def stop(signum, _frame) -> None:
        if server.should_exit:
            server.force_exit = True
        LOG.info("%s: no new connections; finishing in-flight requests", signal.Signals(signum).name)
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    router.start()
    http_thread = threading.Thread(target=http, name="hvdinfer-http", daemon=True)
    http_thread.start()

    def announce() -> None:
        while not server.started and http_thread.is_alive():
            time.sleep(0.05)
        if server.started:
            LOG.info("serving %s (%s) on http://%s:%d with %d rank(s), coordinator pid %d", served.name,
                     served.kind, cfg.host, cfg.port, rt.size, os.getpid())

    threading.Thread(target=announce, name="hvdinfer-announce", daemon=True).start()
    loop.run()  # rank 0 computes like every rank, until the router stops it
    router.thread.join(timeout=10)
    http_thread.join(timeout=10)
    if not server.started:
        raise JobError(f"could not serve on {cfg.host}:{cfg.port} (is the port in use?)")
    LOG.info("served %d s; every rank stops", time.monotonic() - started)
    return {"seconds": time.monotonic() - started}
