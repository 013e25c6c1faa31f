"""hvdinfer.wire's link model (delay, rate, queue limit, loss) and packet addressing, without TUNs;
tests/multihost sends real TCP through it."""
import struct

import pytest

from hvdinfer import wire


def test_a_packet_arrives_after_its_serialization_and_the_delay():
    link = wire.Link(delay=0.001, rate=1e6)  # 1 MB/s: 1,000 bytes take 1 ms
    assert link.arrival(0, 1000, now=10.0) == pytest.approx(10.002)
    # The same sender's next packet waits for the first to leave; another sender's does not.
    assert link.arrival(0, 1000, now=10.0) == pytest.approx(10.003)
    assert link.arrival(1, 1000, now=10.0) == pytest.approx(10.002)
    # Once the link is idle again a packet starts at once.
    assert link.arrival(0, 500, now=20.0) == pytest.approx(20.0015)
    assert wire.Link(delay=0.0005).arrival(0, 10**6, now=1.0) == pytest.approx(1.0005)  # no rate: delay only


def test_a_full_queue_drops_and_loss_follows_its_probability():
    link = wire.Link(rate=1e6, limit=10)  # at most 10 packets waiting to be sent
    sent = [link.arrival(0, 1000, now=0.0) for _ in range(15)]
    assert sent[:10] == pytest.approx([0.001 * (i + 1) for i in range(10)])
    assert sent[10:] == [None] * 5
    assert link.arrival(0, 1000, now=0.0025) == pytest.approx(0.011)  # two have left: room for one more
    lossy = wire.Link(loss=0.25, seed=3)
    lost = sum(lossy.arrival(0, 100, now=0.0) is None for _ in range(4000))
    assert 900 < lost < 1100
    assert wire.Link(loss=0.25, seed=3).arrival(0, 100, 0.0) == wire.Link(loss=0.25, seed=3).arrival(0, 100, 0.0)


def ipv4(destination: str, version: int = 4) -> bytes:
    header = bytearray(20)
    header[0] = version << 4 | 5
    header[16:20] = bytes(int(part) for part in destination.split("."))
    return bytes(10) + bytes(header) + b"payload"  # after the 10-byte virtio-net header


def test_packets_go_to_the_host_their_address_names():
    subnet = bytes([10, 213, 0])
    assert wire.destination(ipv4("10.213.0.1"), subnet) == 0
    assert wire.destination(ipv4("10.213.0.3"), subnet) == 2
    assert wire.destination(ipv4("10.9.0.1"), subnet) is None  # another network
    assert wire.destination(ipv4("10.213.0.1", version=6), subnet) is None  # not IPv4
    assert wire.destination(bytes(12), subnet) is None  # too short to be a packet
    assert struct.calcsize("16sH") == 18  # the ifreq prefix TUNSETIFF reads
