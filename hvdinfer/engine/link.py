"""The engine's own channel between ranks: mpi4py point-to-point on a duplicate of COMM_WORLD.

Why not Horovod collectives: a collective needs every rank to join it, so a rank that is busy
computing, or frozen, blocks all others; the engine needs a coordinator that answers whoever asks
(dynamic allocation), results that travel while other ranks compute, and heartbeats that keep
flowing when one rank stops. Point-to-point messages give all three. The communicator is a
duplicate, so nothing here can match a message of Horovod's or of a user's own MPI code.

Every wait is a poll (`improbe` + sleep) rather than a blocking receive: Open MPI waits in a
blocking call by spinning on a core, which on a host with as many ranks as cores steals the CPU
the other ranks compute with. Every message is ONE pickled MPI message (mpi4py's lowercase API).
`mpi4py.util.pkl5` was tried and dropped: it sends a large object as several MPI messages and its
receiver, holding a lock, blocks in MPI_Mprobe for the later parts while the sender blocks in
MPI_Send of an earlier rendezvous-size part that is only read after all parts are probed; a job
with 0.5 MB chunk results hung that way, with the watchdog blocked on the same lock.
"""
from __future__ import annotations

import time
from typing import Any, Callable

HEARTBEAT, ASSIGN, RESULT, FINISH, BROADCAST = 1, 2, 3, 4, 5
ANY = -1
POLL_START_S, POLL_MAX_S = 0.0005, 0.01


class LinkError(RuntimeError):
    """The engine cannot talk between ranks (e.g. a launch without MPI)."""


class Link:
    """One rank's end of the engine channel. Thread-safe: MPI runs at MPI_THREAD_MULTIPLE."""

    def __init__(self, expected_size: int, comm=None):
        """Over a duplicate of COMM_WORLD, or over `comm` (a communicator of some of the ranks, which
        the link then owns: e.g. the leaders of tensor-parallel groups, hvdinfer/parallel)."""
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise LinkError("MPI is initialised without MPI_THREAD_MULTIPLE; the engine's threads need it")
        world = MPI.COMM_WORLD if comm is None else comm
        if world.Get_size() != expected_size:
            raise LinkError(f"MPI sees {world.Get_size()} process(es) but Horovod sees {expected_size}: the job engine "
                            "needs the MPI controller; launch with mpirun, or horovodrun without --gloo")
        self._any = MPI.ANY_SOURCE
        self.comm = world.Dup() if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def close(self) -> None:
        """Free the communicator; must run before MPI is finalised (job.start arranges it)."""
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    def send(self, obj: Any, dest: int, tag: int) -> None:
        self.comm.send(obj, dest=dest, tag=tag)

    def poll(self, tag: int, source: int = ANY) -> tuple[int, Any] | None:
        """(source, message) if one is waiting, else None; never blocks on a missing message."""
        from mpi4py import MPI

        status = MPI.Status()
        message = self.comm.improbe(source=self._any if source == ANY else source, tag=tag, status=status)
        if message is None:
            return None
        return status.Get_source(), message.recv()

    def wait(self, tag: int, source: int = ANY, idle: Callable[[], None] | None = None) -> tuple[int, Any]:
        """Poll until a message arrives; `idle` runs between polls (it may raise to give up)."""
        pause = POLL_START_S
        while True:
            got = self.poll(tag, source)
            if got is not None:
                return got
            if idle is not None:
                idle()
            time.sleep(pause)
            pause = min(POLL_MAX_S, pause * 2)
