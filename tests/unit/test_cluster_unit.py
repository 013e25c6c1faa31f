"""hvdinfer cluster's pure parts: the core-pinning plan and how the launch command and
launch/nsagent apply it, link shapes as numbers, and the qdisc chosen with and without netem."""
import os
import subprocess
from pathlib import Path

import pytest

from hvdinfer import cluster as cluster_mod
from hvdinfer.runtime import JobError

NSAGENT = Path(__file__).resolve().parents[2] / "launch" / "nsagent"


@pytest.mark.parametrize("hosts, per_host, allowed, want", [
    (2, 1, [0, 1], ("0", "1")),
    (2, 2, [3, 2, 1, 0], ("0,1", "2,3")),
    (1, 1, [5, 7], ("5",)),
    (3, 0, [0], ()),
])
def test_cpu_plan_gives_every_host_cores_of_its_own(hosts, per_host, allowed, want):
    assert cluster_mod.cpu_plan(hosts, per_host, allowed) == want


def test_cpu_plan_refuses_more_cores_than_the_process_may_use():
    with pytest.raises(JobError, match=r"1 x 3 hosts needs 3 cores, but this process may run on 2 \(0,1\)"):
        cluster_mod.cpu_plan(3, 1, [0, 1])
    with pytest.raises(JobError, match="must be >= 0"):
        cluster_mod.cpu_plan(2, -1, [0, 1])


def test_the_first_host_is_pinned_in_the_launch_command_and_the_others_through_nsagent():
    pinned = cluster_mod.Cluster("lab", ("lab-h0", "lab-h1"), 1, ("0", "1"))
    assert pinned.host_cpus_env() == "lab-h0=0 lab-h1=1"
    assert cluster_mod.command(pinned, ["doctor"])[:6] == ["ip", "netns", "exec", "lab-h0", "taskset", "-c"]
    free = cluster_mod.Cluster("lab", ("lab-h0", "lab-h1"), 1)
    assert free.host_cpus_env() == ""
    assert cluster_mod.command(free, ["doctor"])[4] == "unshare"


def nsagent(tmp_path, host, cpus_env):
    """What nsagent would exec, with a stand-in `ip` that prints its arguments."""
    fake = tmp_path / "ip"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", HVDINFER_HOST_CPUS=cpus_env)
    return subprocess.run(["sh", str(NSAGENT), host, "orted", "-x"], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_nsagent_pins_the_named_host_only(tmp_path):
    cpus = "lab-h1=1 lab-h10=2,3"
    assert nsagent(tmp_path, "lab-h1", cpus) == ("netns exec lab-h1 taskset -c 1 unshare --uts /bin/sh -c "
                                                 "hostname lab-h1; orted -x")
    assert nsagent(tmp_path, "lab-h10", cpus).startswith("netns exec lab-h10 taskset -c 2,3 unshare")
    assert nsagent(tmp_path, "lab-h2", cpus).startswith("netns exec lab-h2 unshare")
    assert nsagent(tmp_path, "lab-h1", "").startswith("netns exec lab-h1 unshare")


def test_shape_rates_and_delays_as_numbers():
    assert cluster_mod.Shape(rate="10gbit").rate_bytes_per_s() == pytest.approx(1.25e9)
    assert cluster_mod.Shape(delay="0.1ms", rate="100mbps").rate_bytes_per_s() == pytest.approx(1e8)
    assert cluster_mod.Shape(delay="1ms").delay_s() == pytest.approx(1e-3)
    assert cluster_mod.Shape().rate_bytes_per_s() is None and cluster_mod.Shape().delay_s() == 0
    with pytest.raises(JobError, match="--rate '1 gigabit'"):
        cluster_mod.Shape(rate="1 gigabit").rate_bytes_per_s()


def test_shaping_is_netem_where_the_kernel_has_it_else_tbf_for_a_rate_and_the_wire_for_a_delay():
    Shaping = cluster_mod.Shaping
    both = cluster_mod.Shape(delay="1ms", rate="1gbit")
    assert both.shaping(netem=True) == Shaping("netem", ["netem", "delay", "1ms", "rate", "1gbit"],
                                               "netem delay 1ms rate 1gbit")
    assert both.shaping(netem=False) == Shaping("wire", [], "wire delay 1ms rate 1gbit")
    assert both.wire_args() == ["--delay", "0.001", "--rate", "125000000.0", "--loss", "0.0"]
    assert cluster_mod.Shape(loss="0.5%").shaping(netem=False).how == "wire"
    assert cluster_mod.Shape(loss="0.5%").loss_fraction() == pytest.approx(0.005)
    with pytest.raises(JobError, match="--loss '100%'"):
        cluster_mod.Shape(loss="100%").loss_fraction()
    rate = cluster_mod.Shape(rate="1gbit").shaping(netem=False)
    assert rate.how == "tbf" and rate.qdisc == ["tbf", "rate", "1gbit", "burst", "500000", "latency", "10ms"]
    assert rate.text == "tbf rate 1gbit burst 500000 latency 10ms"
    assert cluster_mod.Shape(rate="10gbit").shaping(netem=False).qdisc[4] == "5000000"
    assert cluster_mod.Shape().shaping(netem=True) == Shaping("", [], "")


def test_cluster_flags_parse():
    from hvdinfer import cli

    args = cli.build_parser().parse_args(["cluster", "run", "--hosts", "2", "--cpus-per-host", "1", "--rate", "1gbit"])
    assert (args.cpus_per_host, args.rate) == (1, "1gbit")
