"""Several hosts on one machine: Linux network namespaces as hosts, a bridge between them, optional
link shaping (`tc netem`, or `tbf` for a rate alone where the kernel has no netem), and a launch
across them through launch/run.sh with a hostfile.

    hvdinfer cluster run --hosts 2 --slots 2 -- doctor --selftest
    hvdinfer cluster run --hosts 2 --slots 1 --delay 1ms --rate 1gbit -- infer --model minilm-l6 ...
    hvdinfer cluster up --hosts 3 --name demo      # keep it up; `hvdinfer cluster down --name demo`
    hvdinfer cluster down --all                    # remove every cluster this tool made
    hvdinfer cluster run --hosts 2 --cpus-per-host 1 -- ...   # each host its own core (taskset)

Each host is a namespace `<name>-h<i>` with its own network stack and, for the processes started in
it, its own hostname (a UTS namespace), so Open MPI and Horovod see separate hosts (local vs cross
ranks, TCP between hosts). Hosts reach each other at 10.213.0.<i+1>/24 through a bridge that lives
in a namespace of its own (`<name>-sw`): nothing is added to the machine's own network. mpirun
starts its daemons in a host through launch/nsagent (the rsh agent: `ip netns exec HOST` plus the
hostname), and horovodrun's ssh checks go through the same agent (an `ssh` shim first on PATH).
`run` always tears the cluster down, on success, failure, Ctrl-C or SIGTERM; `down --all` removes
leftovers of a killed run. Needs root and iproute2 (`ip`, `tc`); `available()` says why not where
namespaces cannot be made, so tests skip with that reason.

Namespaces separate networks, not CPUs: every "host" computes on the same cores. `--cpus-per-host K`
gives host i the i-th K cores this process may run on (`cpu_plan`), and every process started in
the host runs under `taskset` with them (mpirun on the first host, the daemons nsagent starts on
the others, and so every rank), so two 1-core hosts compute like two machines instead of sharing
both cores; the runtime's thread plan follows the affinity (`runtime.host_cores`).

Shaping is on each host's egress, so both directions of a link are shaped once. --delay and --loss
need the kernel's netem qdisc (CONFIG_NET_SCH_NETEM); a kernel without it (as this project's CI VM
kernel) gets --rate from a token bucket (`tbf`, burst = 4 ms at the rate, queue 10 ms), and a
--delay or --loss is refused with that reason rather than silently dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from hvdinfer.runtime import JobError

SUBNET = "10.213.0"
STATE_DIR = Path("/run/hvdinfer-cluster")
LAUNCH = Path(__file__).resolve().parent.parent / "launch"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Link shaping for every host's link (each direction), e.g. delay 1ms, rate 1gbit."""

    delay: str | None = None
    """One-way delay, e.g. 0.1ms or 1ms."""
    rate: str | None = None
    """Bandwidth, e.g. 10gbit or 1gbit."""
    loss: str | None = None
    """Packet loss, e.g. 0.1%."""

    def netem_args(self) -> list[str]:
        args = []
        for key in ("delay", "rate", "loss"):
            if getattr(self, key):
                args += [key, getattr(self, key)]
        return args

    def qdisc_args(self, netem: bool) -> list[str]:
        """The root qdisc for a host's eth0: netem with every setting, or (no netem in the kernel) tbf
        for a rate alone, its bucket 4 ms at the rate (a 250 Hz kernel's tick) and at most 10 ms queued."""
        if not self.netem_args():
            return []
        if netem:
            return ["netem", *self.netem_args()]
        if self.delay or self.loss:
            raise JobError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so --delay and --loss cannot be "
                           "emulated here; --rate alone is shaped with tbf")
        burst = max(64 * 1024, int(self.rate_bytes_per_s() * 0.004))
        return ["tbf", "rate", self.rate, "burst", str(burst), "latency", "10ms"]

    def rate_bytes_per_s(self) -> float | None:
        """The rate in bytes/s as tc reads it (bit units SI: 1gbit = 1e9 bit/s; bps units are bytes)."""
        if not self.rate:
            return None
        return _quantity(self.rate, _RATE_UNITS, "rate")

    def delay_s(self) -> float:
        """The one-way delay in seconds (0 when unshaped)."""
        return _quantity(self.delay, _TIME_UNITS, "delay") if self.delay else 0.0


_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}
_TIME_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6}


def _quantity(text: str, units: dict[str, float], what: str) -> float:
    """"10gbit" -> 1.25e9 with the rate units; "0.1ms" -> 1e-4 with the time units."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", text.strip().lower())
    if not found or found.group(2) not in units:
        raise JobError(f"--{what} {text!r}: expected a number and one of {', '.join(units)}")
    return float(found.group(1)) * units[found.group(2)]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A made cluster: its name, hosts (namespace names), slots per host, and each host's cores."""

    name: str
    hosts: tuple[str, ...]
    slots: int
    cpus: tuple[str, ...] = ()
    """Per host, the cores (a taskset list, e.g. "1" or "2,3") its processes run on; () = unpinned."""
    qdisc: str = ""
    """The root qdisc on every host's link, as given to tc ("" = unshaped)."""

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def hostfile_text(self) -> str:
        return "".join(f"{host} slots={self.slots}\n" for host in self.hosts)

    def host_cpus_env(self) -> str:
        """HVDINFER_HOST_CPUS for launch/nsagent: "HOST=CPUS" pairs, space-separated ("" = unpinned)."""
        return " ".join(f"{host}={cpus}" for host, cpus in zip(self.hosts, self.cpus))


def cpu_plan(hosts: int, per_host: int, allowed: list[int]) -> tuple[str, ...]:
    """Each host's cores as a taskset list: host i gets the i-th `per_host` of the `allowed` cores
    (in order), so no two hosts share one; () when per_host is 0 (no pinning)."""
    if per_host < 0:
        raise JobError(f"--cpus-per-host must be >= 0, got {per_host}")
    if per_host == 0:
        return ()
    cores = sorted(allowed)
    if hosts * per_host > len(cores):
        raise JobError(f"--cpus-per-host {per_host} x {hosts} hosts needs {hosts * per_host} cores, but this "
                       f"process may run on {len(cores)} ({','.join(map(str, cores))})")
    return tuple(",".join(map(str, cores[i * per_host:(i + 1) * per_host])) for i in range(hosts))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise JobError(f"ip {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found (install iproute2 / util-linux)"
    probe = f"hvdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def up(hosts: int, slots: int, shape: Shape = Shape(), name: str | None = None, cpus_per_host: int = 0) -> Cluster:
    """Make the namespaces, the bridge, the links and their shaping; on any error undo it all.
    `cpus_per_host` K > 0 pins each host's processes to K cores of its own (cpu_plan)."""
    name = name or f"hvd{os.getpid() % 10**6}"
    if not _NAME.match(name):
        raise JobError(f"cluster name {name!r}: lowercase letters and digits, at most 10, starting with a letter")
    if not 1 <= hosts <= 250 or slots < 1:
        raise JobError(f"--hosts must be 1..250 and --slots >= 1, got {hosts} and {slots}")
    reason = available()
    if reason:
        raise JobError(f"cannot make namespace hosts here: {reason}")
    cpus = cpu_plan(hosts, cpus_per_host, sorted(os.sched_getaffinity(0)))
    if cpus and shutil.which("taskset") is None:
        raise JobError("--cpus-per-host needs taskset (util-linux)")
    qdisc = shape.qdisc_args(netem_available()) if shape.netem_args() else []
    cluster = Cluster(name, tuple(f"{name}-h{i}" for i in range(hosts)), slots, cpus, " ".join(qdisc))
    if cluster.switch in _namespaces():
        raise JobError(f"a cluster named {name} already exists; `hvdinfer cluster down --name {name}` first")
    try:
        _ip("netns", "add", cluster.switch)
        _ip("-n", cluster.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", cluster.switch, "link", "set", "br0", "up")
        for i, host in enumerate(cluster.hosts):
            _ip("netns", "add", host)
            _ip("-n", host, "link", "set", "lo", "up")
            # Made inside the switch namespace (names there are private), then one end moved.
            _ip("-n", cluster.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"e{i}")
            _ip("-n", cluster.switch, "link", "set", f"e{i}", "netns", host)
            _ip("-n", host, "link", "set", f"e{i}", "name", "eth0")
            _ip("-n", host, "addr", "add", f"{cluster.address(i)}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", cluster.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", cluster.switch, "link", "set", f"p{i}", "up")
            if qdisc:
                _tc(host, "qdisc", "add", "dev", "eth0", "root", *qdisc)
        _save(cluster, shape)
    except BaseException:
        down(cluster.name)
        raise
    return cluster


_NETEM: list[bool] = []


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (probed once, on loopback in a throwaway namespace)."""
    if not _NETEM:
        probe = f"hvdnetem{os.getpid()}"
        _ip("netns", "add", probe)
        try:
            done = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                                  capture_output=True, text=True)
            _NETEM.append(done.returncode == 0)
        finally:
            _ip("netns", "del", probe, check=False)
    return _NETEM[0]


def _tc(namespace: str, *args: str) -> None:
    done = subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True)
    if done.returncode:
        raise JobError(f"tc {' '.join(args)} in {namespace}: {done.stderr.strip() or 'failed'}")


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _save(cluster: Cluster, shape: Shape) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / f"{cluster.name}.json").write_text(json.dumps(
        {**dataclasses.asdict(cluster), "shape": dataclasses.asdict(shape)}))


def load(name: str) -> Cluster:
    try:
        state = json.loads((STATE_DIR / f"{name}.json").read_text())
    except FileNotFoundError:
        raise JobError(f"no cluster named {name} (made clusters: {', '.join(made()) or 'none'})") from None
    return Cluster(state["name"], tuple(state["hosts"]), state["slots"], tuple(state.get("cpus", ())),
                   state.get("qdisc", ""))


def made() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def down(name: str) -> None:
    """Remove a cluster's namespaces (their links and shaping go with them) and its state; idempotent."""
    for namespace in _namespaces():
        if namespace == f"{name}-sw" or re.fullmatch(rf"{re.escape(name)}-h\d+", namespace):
            _kill_processes_in(namespace)
            _ip("netns", "del", namespace, check=False)
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)


def _kill_processes_in(namespace: str) -> None:
    """A namespace is only gone when nothing runs in it: end what a killed job left there."""
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def set_link(cluster: Cluster, host: int, state: str) -> None:
    """Take a host's link down or bring it up ("down" | "up"): a network partition."""
    _ip("-n", cluster.hosts[host], "link", "set", "eth0", state)


def launch_env(cluster: Cluster, workdir: Path, launcher: str, np_: int) -> dict[str, str]:
    """The environment launch/run.sh needs to start ranks across the namespace hosts."""
    hostfile = workdir / "hostfile"
    hostfile.write_text(cluster.hostfile_text())
    shim = workdir / "bin"
    shim.mkdir(exist_ok=True)
    ssh = shim / "ssh"
    ssh.write_text(f"#!/bin/sh\nexec {LAUNCH / 'nsssh'} \"$@\"\n")
    ssh.chmod(0o755)
    subnet = f"{SUBNET}.0/24"
    # Open MPI reads MCA settings from OMPI_MCA_* variables: the same for mpirun and for the mpirun
    # horovodrun starts. The daemons start through nsagent; TCP only, on the hosts' subnet.
    mca = {"plm_rsh_agent": str(LAUNCH / "nsagent"), "oob_tcp_if_include": subnet,
           "btl_tcp_if_include": subnet, "btl": "self,tcp"}
    env = dict(os.environ, HOSTFILE=str(hostfile), NP=str(np_), LAUNCHER=launcher,
               PATH=f"{shim}:{os.environ.get('PATH', '')}", **{f"OMPI_MCA_{k}": v for k, v in mca.items()})
    # nsagent pins the daemons it starts (and so their ranks) to their host's cores.
    env["HVDINFER_HOST_CPUS"] = cluster.host_cpus_env()
    if launcher == "horovodrun":
        env["LAUNCH_ARGS"] = "--network-interfaces eth0"  # the hosts' one interface: no probing
    return env


def command(cluster: Cluster, argv: list[str]) -> list[str]:
    """The command that runs `hvdinfer ARGV` through launch/run.sh from the cluster's first host."""
    first = cluster.hosts[0]
    pin = ["taskset", "-c", cluster.cpus[0]] if cluster.cpus else []  # mpirun and the first host's ranks
    return ["ip", "netns", "exec", first, *pin, "unshare", "--uts", "sh", "-c", f'hostname {first}; exec "$0" "$@"',
            str(LAUNCH / "run.sh"), *argv]


def run(cluster: Cluster, argv: list[str], launcher: str = "mpirun", np_: int | None = None) -> int:
    """`hvdinfer ARGV` on every slot of the cluster (or NP ranks); the exit status."""
    with tempfile.TemporaryDirectory(prefix="hvdinfer-cluster-") as scratch:
        env = launch_env(cluster, Path(scratch), launcher, np_ or len(cluster.hosts) * cluster.slots)
        return subprocess.run(command(cluster, argv), env=env).returncode


def main(args) -> int:
    """`hvdinfer cluster up|down|run` (flags parsed by hvdinfer.cli)."""
    if args.action == "down":
        for name in (made() if args.all else [args.name]):
            down(name)
        return 0
    shape = Shape(args.delay, args.rate, args.loss)
    if args.action == "up":
        cluster = up(args.hosts, args.slots, shape, args.name, args.cpus_per_host)
        cores = f", cores {' | '.join(cluster.cpus)}" if cluster.cpus else ""
        link = f", links: {cluster.qdisc}" if cluster.qdisc else ""
        print(f"cluster {cluster.name}: hosts {', '.join(cluster.hosts)} ({cluster.slots} slot(s) each{cores}{link})",
              flush=True)
        return 0
    if not args.argv:
        raise JobError("cluster run: give the hvdinfer command after --, e.g. -- doctor --selftest")
    existing = bool(args.name) and args.name in made()  # made by `up`: left up after the run
    cluster = load(args.name) if existing else up(args.hosts, args.slots, shape, args.name, args.cpus_per_host)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run(cluster, args.argv, args.launcher, args.np or None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not existing:
            down(cluster.name)


@contextlib.contextmanager
def running(hosts: int, slots: int, shape: Shape = Shape(), name: str | None = None, cpus_per_host: int = 0):
    """A cluster for the length of a `with` block, torn down on leaving it, on SIGTERM too."""
    cluster = up(hosts, slots, shape, name, cpus_per_host)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        down(cluster.name)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
