"""Process runtime for every hvdinfer job: Horovod init, per-rank threads, device pinning,
coordinator logging, seeding and fail-fast.

One job process per rank, launched for example with

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer doctor --selftest
    horovodrun -np 2 .venv/bin/hvdinfer doctor --selftest

Why the defaults (measured on a 2-core host; `hvdinfer bench runtime` shows each piece):
Horovod's background thread runs a negotiation round with its peers every HOROVOD_CYCLE_TIME
(1 ms), even when no collective is pending. Under the MPI controller that round is a blocking MPI
collective, and Open MPI waits in blocking calls by busy-polling: the rank that arrives first spins
until its peer arrives. With ranks out of phase, each rank's background thread burns most of a core
all job long, and two ranks on two cores compute at about half speed (0.46x one Keras process).
The fix is where the spin happens: `init_runtime` asks Open MPI to yield the core while it waits
(`OMPI_MCA_mpi_yield_when_idle=1`, read by MPI_Init), which restores full speed and keeps Horovod's
1 ms cycle, so collectives stay as fast as before. (A long cycle time also hides the spin, but adds
up to one cycle of latency to every collective; the Gloo controller does not spin.) Each rank also
gets its share of the host's cores for TF's thread pools, so N ranks never run N x cores threads.

Memory: TF's default CPU allocator takes large buffers from the OS and returns them when freed, so
the kernel faults fresh zeroed pages in for the next ones: every training step's activations and
gradients, and every Horovod allreduce's output tensor. `init_runtime` switches TF to its pooling
BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`). Measured on this 2-core host (`hvdinfer bench
comm`): fine-tuning steps 1.2x faster (1 and 2 ranks), a 64 MiB allreduce over a 1 Gbit/s link at
the raw mpi4py speed (575 ms, was 620 ms), peak RSS within a few percent.

Precision: `--precision auto` (the default) computes in bf16 only where the hardware does bf16
arithmetic natively (a GPU of compute capability >= 8.0; a CPU with avx512_bf16 or amx_bf16) and in
fp32 everywhere else: without those instructions TF emulates bf16, and fine-tuning ran 3.6x slower
than fp32 on this machine's AMD EPYC. `choose_precision` is the decision, `resolve_precision` feeds
it this host's /proc/cpuinfo flags and GPUs.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

LOG = logging.getLogger("hvdinfer")

# Horovod: env knobs read once by hvd.init(); a user's own setting always wins.
STALL_WARNING_SECONDS = 60
STALL_SHUTDOWN_SECONDS = 300

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)
CPUINFO = Path("/proc/cpuinfo")


class JobError(Exception):
    """An error every rank detects identically (bad flags, bad input): the coordinator reports it.

    Errors that may differ by rank should be plain exceptions: each failing rank reports its own.
    """


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How one rank's process is set up before any TensorFlow op runs."""

    intra_op_threads: int = 0
    """TF intra-op threads per rank; 0 = this host's cores divided by the ranks on it."""
    inter_op_threads: int = 0
    """TF inter-op threads per rank; 0 = 1 when sharing a host, else 2."""
    cycle_time_ms: float = 0.0
    """Horovod background-loop cycle (HOROVOD_CYCLE_TIME); 0 = Horovod's own (1 ms). Env wins."""
    stall_shutdown_seconds: int = STALL_SHUTDOWN_SECONDS
    """End the job when ranks disagree on collectives for this long (0 = never)."""
    seed: int = 0
    """Seed for Python, NumPy and TF; the same on every rank."""
    tuned: bool = True
    """False reproduces Horovod's and TF's defaults (the naive baseline in benchmarks)."""
    pipeline_stages: int = 1
    """Devices per rank (--pp): GPUs local_rank*K .. local_rank*K+K-1, or K logical CPU devices."""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a task needs to know about its place in the job."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_size: int
    intra_op_threads: int
    inter_op_threads: int
    device: str
    controller: str
    devices: tuple[str, ...] = ()
    """This rank's pipeline-stage devices (RuntimeConfig.pipeline_stages of them; `device` is the first)."""

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


_RUNTIME: Runtime | None = None


def launcher_rank() -> int:
    """This process's rank as told by the launcher, before (or without) Horovod init."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def launcher_size() -> int:
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _launcher_local_size() -> int:
    for var in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def host_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_plan(config: RuntimeConfig, local_size: int, cores: int) -> tuple[int, int]:
    """(intra, inter) TF threads for one rank: an even share of the host's cores per local rank."""
    if not config.tuned:
        return 0, 0  # TF's own default: every core, per process
    share = max(1, cores // max(1, local_size))
    intra = config.intra_op_threads or share
    # Pipeline stages overlap only when the executor can run one op per stage at a time.
    inter = config.inter_op_threads or max(config.pipeline_stages, 1 if local_size > 1 else 2)
    return intra, inter


def _set_horovod_env(config: RuntimeConfig) -> None:
    # Horovod: read by hvd.init(); setdefault keeps whatever the user exported.
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(STALL_WARNING_SECONDS))
    if config.stall_shutdown_seconds:
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(config.stall_shutdown_seconds))
    if config.cycle_time_ms:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", f"{config.cycle_time_ms:g}")
    # Horovod: tensor-parallel groups are process sets added after init (hvdinfer/parallel/tensor_parallel.py).
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    if config.tuned:
        # Open MPI: yield the core while waiting in a blocking call instead of spinning on it.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        # TF: pool CPU tensor memory (read at TF's first allocation, so before any op runs). The default
        # allocator gives large buffers back to the OS and faults fresh pages in for the next ones.
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def init_runtime(config: RuntimeConfig | None = None) -> Runtime:
    """Initialise Horovod and TensorFlow for this rank. Idempotent; returns the same Runtime."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    config = config or RuntimeConfig()
    _set_horovod_env(config)
    cores = host_cores()
    intra, inter = thread_plan(config, _launcher_local_size(), cores)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    _init_mpi_first()
    import tensorflow as tf
    import horovod.tensorflow as hvd

    # TF: thread pools are fixed at the first op, so set them before anything else touches TF.
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    hvd.init()
    # init may have learnt a local size the launcher did not export (e.g. a plain mpirun).
    if config.tuned and hvd.local_size() != _launcher_local_size() and not config.intra_op_threads:
        intra, inter = thread_plan(config, hvd.local_size(), cores)
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)

    device = _pin_device(tf, hvd.local_rank(), config.pipeline_stages)
    devices = stage_devices(config.pipeline_stages)
    seed_everything(config.seed)
    _RUNTIME = Runtime(
        rank=hvd.rank(),
        size=hvd.size(),
        local_rank=hvd.local_rank(),
        local_size=hvd.local_size(),
        cross_size=hvd.cross_size(),
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        device=device,
        controller="mpi" if hvd.mpi_enabled() else "gloo",
        devices=tuple(devices),
    )
    setup_logging(_RUNTIME.rank)
    return _RUNTIME


def release_horovod() -> None:
    """Stop Horovod's background thread in a job that needs no more Horovod collectives because its
    ranks talk over the engine's link from here on (`hvdinfer serve`). Every rank calls it at the
    same point.

    With nothing to reduce, that thread still negotiates with its peers every cycle, and under the
    MPI controller the rank that arrives first waits for the other by yielding in a loop: an idle
    2-rank server burnt a whole core of this 2-core host (half a core per rank, a long cycle time no
    better), and under load about 1 s of CPU per rank in 18 s. MPI stays up (mpi4py initialised it,
    see `_init_mpi_first`), so the link, the watchdog and the exit are unaffected; a Horovod
    collective after this raises instead of running.
    """
    import horovod.tensorflow as hvd

    hvd.shutdown()


def _init_mpi_first() -> None:
    """MPI is initialised by mpi4py (MPI_THREAD_MULTIPLE), before Horovod, so it outlives Horovod.

    When Horovod initialises MPI it also finalises it, from its background thread, as soon as any
    rank shuts Horovod down; the other ranks' engine threads (hvdinfer.engine) would then call MPI
    after MPI_Finalize and crash on the way out. Initialised here, MPI stays up until this process
    exits. Skipped under Horovod's Gloo controller, which runs without MPI.
    """
    if os.environ.get("HOROVOD_CONTROLLER", "").lower() != "gloo":
        from mpi4py import MPI  # noqa: F401 - the import initialises MPI


def _pin_device(tf, local_rank: int, stages: int = 1) -> str:
    """Horovod: one GPU per local rank when GPUs exist (with `stages` pipeline stages, GPUs
    local_rank*stages .. local_rank*stages+stages-1); CPU otherwise."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "/CPU:0"
    if stages == 1:
        mine = [gpus[local_rank % len(gpus)]]
    else:
        first = local_rank * stages
        if first + stages > len(gpus):
            raise JobError(f"--pp {stages}: local rank {local_rank} needs GPUs {first}..{first + stages - 1}, "
                           f"but this host has {len(gpus)}; run fewer ranks per host or fewer stages")
        mine = gpus[first:first + stages]
    tf.config.set_visible_devices(mine, "GPU")
    for gpu in mine:
        tf.config.experimental.set_memory_growth(gpu, True)
    return "/GPU:0"  # the first visible GPU of this process


def stage_devices(stages: int) -> list[str]:
    """The devices of this rank's `stages` pipeline stages: its visible GPUs (pinned by init_runtime),
    else logical CPU devices, made here when TF has not yet initialised its devices, so a CPU host
    runs the same placement code as a GPU host. Idempotent."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        if len(gpus) < stages:
            raise JobError(f"--pp {stages} needs {stages} GPUs per rank, this rank sees {len(gpus)} "
                           f"(start the runtime with pipeline_stages={stages})")
        return [f"/GPU:{s}" for s in range(stages)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    have = tf.config.get_logical_device_configuration(cpu) or [None]
    if len(have) < stages:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(stages)])
        except RuntimeError:
            raise JobError(f"--pp {stages} needs {stages} logical CPU devices, but TensorFlow already initialised "
                           f"{len(have)}: start the runtime with pipeline_stages={stages}") from None
    return [f"/CPU:{s}" for s in range(stages)]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def read_cpuinfo() -> str:
    """This host's /proc/cpuinfo ("" where there is none)."""
    return CPUINFO.read_text() if CPUINFO.is_file() else ""


def cpuinfo_field(cpuinfo: str, *keys: str) -> str:
    """The value of the first line of /proc/cpuinfo text whose key is one of `keys` ("" if none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return ""


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """The CPU feature flags in /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    return set(cpuinfo_field(cpuinfo, "flags", "Features").split())


def cpuinfo_model(cpuinfo: str) -> str:
    return cpuinfo_field(cpuinfo, "model name", "Model name", "Hardware") or "unknown"


def native_bf16(cpu_flags: set[str], gpu_capabilities: list[tuple[int, int]]) -> tuple[bool, str]:
    """(whether the device that computes does bf16 natively, why). With GPUs the GPUs compute, so
    they alone decide; every one of them must be native."""
    if gpu_capabilities:
        worst = min(gpu_capabilities)
        ok = worst >= BF16_MIN_COMPUTE_CAPABILITY
        return ok, (f"GPU compute capability {worst[0]}.{worst[1]} "
                    f"{'>=' if ok else '<'} {BF16_MIN_COMPUTE_CAPABILITY[0]}.{BF16_MIN_COMPUTE_CAPABILITY[1]}")
    have = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags]
    if have:
        return True, f"CPU has {' and '.join(have)}"
    return False, f"CPU has neither {' nor '.join(BF16_CPU_FLAGS)}, so bf16 would be emulated, slower than fp32"


def choose_precision(requested: str, cpu_flags: set[str],
                     gpu_capabilities: list[tuple[int, int]]) -> tuple[str, str]:
    """(fp32 or bf16, why): `auto` is bf16 only on hardware with native bf16 compute; an explicit
    fp32 or bf16 is honoured."""
    if requested not in PRECISIONS:
        raise JobError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    native, why = native_bf16(cpu_flags, gpu_capabilities)
    if requested != "auto":
        return requested, f"requested ({why})"
    return ("bf16" if native else "fp32"), f"auto: {why}"


def visible_gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each GPU this process sees (after pinning: its own)."""
    import tensorflow as tf

    found = []
    for gpu in tf.config.get_visible_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append(tuple(capability) if capability else (0, 0))
    return found


def agree_precision(decisions: list[tuple[str, str, bool]]) -> tuple[str, str]:
    """One job computes in one precision: from every rank's (precision, why, native), rank 0's
    choice, or fp32 where `auto` chose differently on some rank (it lacks native bf16)."""
    if any(d[0] != decisions[0][0] for d in decisions):
        rank = next(r for r, d in enumerate(decisions) if not d[2])
        return "fp32", f"{decisions[rank][1]} on rank {rank}"
    return decisions[0][0], decisions[0][1]


def resolve_precision(requested: str, gather: Callable[[Any], list] | None = None) -> tuple[str, str]:
    """(precision, why) for this job on this hardware, logged once by the coordinator.

    `gather` (collect.allgather_json, called by every rank) makes the ranks of a job agree.
    """
    flags, gpus = cpuinfo_flags(read_cpuinfo()), visible_gpu_capabilities()
    mine = (*choose_precision(requested, flags, gpus), native_bf16(flags, gpus)[0])
    decisions = [tuple(d) for d in gather(list(mine))] if gather else [mine]
    precision, why = agree_precision(decisions)
    if _RUNTIME is None or _RUNTIME.is_coordinator:
        emulated = [str(rank) for rank, d in enumerate(decisions) if not d[2]]
        if precision == "bf16" and emulated:
            LOG.warning("precision bf16: %s; rank(s) %s lack native bf16 compute: expect it slower than fp32",
                        why, ", ".join(emulated))
        else:
            LOG.info("precision %s: %s", precision, why)
    return precision, why


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__(f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")


def setup_logging(rank: int, verbose: bool = False) -> None:
    """The coordinator logs at INFO; other ranks only say WARNING and worse."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(rank))
    LOG.handlers[:] = [handler]
    LOG.propagate = False
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)


def failure_line(exc: BaseException, rank: int, size: int) -> str:
    """One line naming the failing rank, the exception type and its message."""
    message = str(exc).strip().replace("\n", " | ") or "(no message)"
    if isinstance(exc, JobError):
        return f"hvdinfer: error: {message}"
    return f"hvdinfer: rank {rank} of {size} failed: {type(exc).__name__}: {message}"


LAUNCHERS = ("mpirun", "orterun", "mpiexec", "prterun")
LAUNCHER_GRACE_S = 5.0
# Runs detached after this rank is gone: when the launcher is still there after the grace period
# (its teardown is waiting on a host it cannot reach), interrupt it twice (Open MPI's "forcibly
# terminate"), then kill it. It checks the pid still names a launcher before every signal.
_LAUNCHER_GUARD = """
sleep "$2"
for sig in INT INT KILL; do
  name=$(cat /proc/$1/comm 2>/dev/null) || exit 0
  case "$name" in mpirun|orterun|mpiexec|prterun) kill -$sig "$1" 2>/dev/null || exit 0 ;; *) exit 0 ;; esac
  sleep 2
done
"""


def end_process(code: int) -> NoReturn:
    """End this rank now, and make sure the launcher ends too.

    mpirun tears the whole job down when one rank exits non-zero, but its teardown waits on every
    host's daemon: with a host unreachable (a network partition) it waited 446 s. So a rank started
    by mpirun itself leaves a detached guard that ends a launcher still there after
    LAUNCHER_GRACE_S (env HVDINFER_LAUNCHER_GRACE_S); on a healthy job the launcher is gone by then
    and the guard does nothing.
    """
    parent = os.getppid()
    if code != 0 and _process_name(parent) in LAUNCHERS:
        grace = os.environ.get("HVDINFER_LAUNCHER_GRACE_S", str(LAUNCHER_GRACE_S))
        try:
            subprocess.Popen(["/bin/sh", "-c", _LAUNCHER_GUARD, "guard", str(parent), grace],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
        except OSError:
            pass
    os._exit(code)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def abort_job(exc: BaseException, code: int = 1) -> NoReturn:
    """Report `exc` once and end this rank at once, which makes the launcher end every rank.

    os._exit skips Horovod's shutdown (it would wait on peers that may be blocked in a collective);
    mpirun and horovodrun both tear the whole job down when one rank exits non-zero.
    """
    rank, size = (_RUNTIME.rank, _RUNTIME.size) if _RUNTIME else (launcher_rank(), launcher_size())
    if not isinstance(exc, JobError) or rank == 0:
        if os.environ.get("HVDINFER_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)
        print(failure_line(exc, rank, size), file=sys.stderr, flush=True)
    sys.stdout.flush()
    end_process(code)


def exit_now(code: int) -> NoReturn:
    """End the process once a command has returned `code`, skipping the interpreter's teardown.

    Everything a normal exit does that matters is done first, in its order: the command's
    non-daemon threads are joined, the atexit handlers run (the watchdog's stop, Horovod's shutdown),
    MPI is finalized if mpi4py started it, logs and stdio are flushed. What is skipped is Python
    tearing down TensorFlow's modules and objects one by one: 1.2-1.4 s a process here, for nothing
    (every output is already closed, fsynced and renamed into place before a command returns).
    """
    # The interpreter's own first two steps at exit, in its order (CPython's private calls): wake
    # and join the non-daemon threads (concurrent.futures workers included), then the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpi4py finalizes in the interpreter's teardown, which os._exit skips
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_fail_fast(main: Callable[[], int | None]) -> int:
    """Run `main`; any exception on any rank ends the whole job quickly with that rank's message."""
    try:
        return main() or 0
    except KeyboardInterrupt as exc:
        abort_job(exc, 130)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        if isinstance(exc.code, str):
            abort_job(JobError(exc.code))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code)  # argparse and friends have already said why
    except BaseException as exc:  # noqa: BLE001 - the whole point is to catch everything
        abort_job(exc)


def hostname() -> str:
    return socket.gethostname()
