"""A userspace wire between namespace hosts, for link delay and loss on a kernel without netem.

`hvdinfer cluster` shapes links with `tc netem` where the kernel has it. This project's CI VM kernel
has neither netem nor fq (only tbf and htb), so a --delay or --loss there is carried out here: each
host's eth0 is a TUN device held by this one process, which reads every IP packet a host sends,
holds it for the link's serialization time (--rate, per sending host, like an egress qdisc) and
one-way delay, drops it with the --loss probability, and writes it into the addressed host's TUN.

    ip netns exec SWITCH python -m hvdinfer.wire --hosts h0,h1 --subnet 10.213.0 --delay 0.001 --rate 1.25e8

The TUNs use segmentation offload (virtio-net headers): the kernel hands over TCP super-packets of up
to 64 KB as veth does, so the link keeps a 1500-byte MTU while this loop moves a few thousand packets
a second at 1 Gbit/s. A packet's serialization time counts its bytes as handed over; loss drops a whole
super-packet, as netem does to a GSO packet on veth. The process prints "ready" once every TUN exists
and runs until it is killed (`cluster down` kills what runs in the switch namespace); the TUNs vanish
with it.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_CLONE_NEWNET = 0x40000000
_VNET_HDR = 10  # struct virtio_net_hdr, the TUN default header size
_READ = 65535 + _VNET_HDR


def _setns(namespace_fd: int) -> None:
    """Move this (single-threaded) process into the network namespace that `namespace_fd` refers to."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(namespace_fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def open_tun(name: str) -> int:
    """A non-blocking TUN device `name` in the current network namespace, with offloads on."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR))
    fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
    return fd


class Link:
    """The shaping of every host's link: one-way delay (s), rate (bytes/s, None = unlimited), loss
    (a probability), and how many packets a host may have waiting to be sent before the next is
    dropped (netem's default limit, 1000: with 64 KB super-packets TCP's windows fill it rarely; a
    lost super-packet is 40-odd segments at once, which can cost TCP a 200 ms retransmit timeout)."""

    def __init__(self, delay: float = 0.0, rate: float | None = None, loss: float = 0.0, limit: int = 1000,
                 seed: int = 0):
        self.delay, self.rate, self.loss, self.limit = delay, rate, loss, limit
        self._random = random.Random(seed)
        self._free_at: dict[int, float] = {}
        self._queued: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def arrival(self, source: int, nbytes: int, now: float) -> float | None:
        """When a packet of `nbytes` sent by host `source` at `now` arrives, or None if it is lost."""
        if self.loss and self._random.random() < self.loss:
            return None
        departs = now
        if self.rate:
            queued = self._queued[source]
            while queued and queued[0] <= now:
                queued.popleft()  # sent by now
            if len(queued) >= self.limit:
                return None  # the sender's queue is full: tail drop, as a qdisc's limit does
            departs = max(now, self._free_at.get(source, 0.0)) + nbytes / self.rate
            self._free_at[source] = departs
            queued.append(departs)
        return departs + self.delay


def destination(packet: bytes, subnet: bytes) -> int | None:
    """The host index an IPv4 packet (after its virtio-net header) is addressed to: subnet.<i+1>."""
    ip = packet[_VNET_HDR:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[16:19] != subnet:
        return None
    return ip[19] - 1


def relay(fds: list[int], subnet: bytes, link: Link) -> None:
    """Move packets between the hosts' TUNs for ever, each at its arrival time."""
    pending: list[tuple[float, int, int, bytes]] = []  # (arrival, sequence, destination fd, packet)
    sequence = 0
    host_of = {fd: i for i, fd in enumerate(fds)}
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, _READ)
                except BlockingIOError:
                    break
                target = destination(packet, subnet)
                if target is None or not 0 <= target < len(fds) or target == host_of[fd]:
                    continue  # not for another host of this cluster (e.g. IPv6 router solicitations)
                arrives = link.arrival(host_of[fd], len(packet) - _VNET_HDR, time.monotonic())
                if arrives is not None:
                    heapq.heappush(pending, (arrives, sequence, fds[target], packet))
                    sequence += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, fd, packet = heapq.heappop(pending)
            try:
                os.write(fd, packet)
            except OSError:
                pass  # the receiving host's link is down (a partition): the packet is lost


def _run_first() -> None:
    """Real-time priority where allowed: a NIC moves packets off the host's cores, and the wire shares
    them with busy ranks, so it should run when a packet is due, not when a rank's time slice ends.
    It sleeps in select() whenever nothing is due, and the kernel's RT throttling bounds it."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass  # an ordinary priority: the links only get more jitter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdinfer.wire", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", required=True, help="the hosts' namespace names, comma-separated, in order")
    parser.add_argument("--subnet", required=True, help="the hosts' /24, e.g. 10.213.0 (host i is .i+1)")
    parser.add_argument("--device", default="eth0", help="the TUN's name inside each host")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes/s per sending host (0 = unlimited)")
    parser.add_argument("--loss", type=float, default=0.0, help="probability that a packet is lost")
    parser.add_argument("--limit", type=int, default=1000, help="packets a host may have waiting (netem's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = []
    for host in args.hosts.split(","):
        namespace = os.open(f"/run/netns/{host}", os.O_RDONLY)
        _setns(namespace)
        os.close(namespace)
        fds.append(open_tun(args.device))
    _setns(home)  # back, so that `ip netns pids SWITCH` finds this process (and `cluster down` ends it)
    os.close(home)
    subnet = bytes(int(part) for part in args.subnet.split("."))
    _run_first()
    print("ready", flush=True)
    relay(fds, subnet, Link(args.delay, args.rate or None, args.loss, args.limit, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
