"""What every job starts with: the runtime (Horovod, threads, device), the engine's link between
ranks and the stuck-rank watchdog. Idempotent: a task, the public API and a user's script may all
call `start`; the first call decides."""
from __future__ import annotations

import atexit
import dataclasses

from hvdinfer import runtime
from hvdinfer.engine import link as link_mod
from hvdinfer.engine import watchdog as watchdog_mod


@dataclasses.dataclass(frozen=True)
class Job:
    rt: runtime.Runtime
    link: link_mod.Link | None
    watchdog: watchdog_mod.Watchdog


_JOB: Job | None = None


def _stop(dog: watchdog_mod.Watchdog, link: link_mod.Link | None) -> None:
    dog.stop()
    if link is not None:
        link.close()


def start(runtime_config: runtime.RuntimeConfig | None = None,
          stall_timeout: float = watchdog_mod.DEFAULT_TIMEOUT_S) -> Job:
    global _JOB
    if _JOB is not None:
        return _JOB
    if stall_timeout <= 0:
        raise runtime.JobError(f"--stall-timeout must be > 0 seconds, got {stall_timeout:g}")
    rt = runtime.init_runtime(runtime_config)
    try:
        link = link_mod.Link(rt.size) if rt.size > 1 else None
    except link_mod.LinkError as exc:
        raise runtime.JobError(str(exc)) from None
    dog = watchdog_mod.start(link, rt.rank, rt.size, stall_timeout)
    # Runs before Horovod's own exit handler (registered earlier, by hvd.init): no heartbeat is
    # in flight when MPI finalises.
    atexit.register(_stop, dog, link)
    _JOB = Job(rt, link, dog)
    return _JOB
