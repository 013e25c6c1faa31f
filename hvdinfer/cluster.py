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

Shaping is on each host's egress, so both directions of a link are shaped once. Where the kernel has
the netem qdisc, every setting is netem's. This project's CI VM kernel has no netem (and no fq: only
tbf and htb), so there a --rate alone is a token bucket (`tbf`, burst = 4 ms at the rate, queue 10
ms), and a --delay or --loss makes each host's eth0 a TUN device served by `hvdinfer.wire`, a
userspace wire that delays, rate-limits and drops packets (one process in the switch namespace, in
place of the bridge). The wire runs on the ranks' cores: a third to a half of a core at 1 Gbit/s here,
and at most about 3.5 Gbit/s on this 2-core machine (README, Launch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import select
import subprocess
import sys
import tempfile
from pathlib import Path

from hvdinfer.runtime import JobError

SUBNET = "10.213.0"
STATE_DIR = Path("/run/hvdinfer-cluster")
LAUNCH = Path(__file__).resolve().parent.parent / "launch"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


@dataclasses.dataclass(frozen=True)
class Shaping:
    """A Shape as applied on this kernel."""

    how: str
    """"" (unshaped), "netem", "tbf" (a rate alone, no netem) or "wire" (a delay or loss, no netem)."""
    qdisc: list[str]
    """The root qdisc of every host's eth0; [] when unshaped or shaped by the wire."""
    text: str
    """What `cluster status` and the bench report say of the links."""


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

    def shaping(self, netem: bool) -> Shaping:
        """How this shape is applied where the kernel has netem or not: netem with every setting; tbf
        for a rate alone (its bucket 4 ms at the rate, a 250 Hz kernel's tick, and at most 10 ms
        queued); hvdinfer.wire for a delay or loss without netem; nothing when unshaped."""
        if not self.netem_args():
            return Shaping("", [], "")
        if netem:
            qdisc = ["netem", *self.netem_args()]
            return Shaping("netem", qdisc, " ".join(qdisc))
        if self.delay or self.loss:
            return Shaping("wire", [], f"wire {' '.join(self.netem_args())}")
        burst = max(64 * 1024, int(self.rate_bytes_per_s() * 0.004))
        qdisc = ["tbf", "rate", self.rate, "burst", str(burst), "latency", "10ms"]
        return Shaping("tbf", qdisc, " ".join(qdisc))

    def wire_args(self) -> list[str]:
        """hvdinfer.wire's flags for this shape (its queue limit is netem's default, 1000 packets)."""
        return ["--delay", repr(self.delay_s()), "--rate", repr(self.rate_bytes_per_s() or 0.0),
                "--loss", repr(self.loss_fraction())]

    def rate_bytes_per_s(self) -> float | None:
        """The rate in bytes/s as tc reads it (bit units SI: 1gbit = 1e9 bit/s; bps units are bytes)."""
        if not self.rate:
            return None
        return _quantity(self.rate, _RATE_UNITS, "rate")

    def delay_s(self) -> float:
        """The one-way delay in seconds (0 when unshaped)."""
        return _quantity(self.delay, _TIME_UNITS, "delay") if self.delay else 0.0

    def loss_fraction(self) -> float:
        """The loss as a probability ("0.1%" -> 0.001; 0 when none)."""
        loss = _quantity(self.loss, {"%": 0.01}, "loss") if self.loss else 0.0
        if not 0 <= loss < 1:
            raise JobError(f"--loss {self.loss!r}: expected a percentage below 100%")
        return loss


_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}
_TIME_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6}


def _quantity(text: str, units: dict[str, float], what: str) -> float:
    """"10gbit" -> 1.25e9 with the rate units; "0.1ms" -> 1e-4 with the time units."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+|%)", text.strip().lower())
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
    shaping: str = ""
    """How every host's link is shaped: the root qdisc as given to tc, or "wire ..." (hvdinfer.wire)
    with the shape's settings; "" = unshaped."""

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
    shaping = shape.shaping(bool(shape.netem_args()) and netem_available())
    cluster = Cluster(name, tuple(f"{name}-h{i}" for i in range(hosts)), slots, cpus, shaping.text)
    if cluster.switch in _namespaces():
        raise JobError(f"a cluster named {name} already exists; `hvdinfer cluster down --name {name}` first")
    try:
        _ip("netns", "add", cluster.switch)
        for host in cluster.hosts:
            _ip("netns", "add", host)
            _ip("-n", host, "link", "set", "lo", "up")
        if shaping.how == "wire":
            _start_wire(cluster, shape)  # every host's eth0 is a TUN the wire serves
        else:
            _ip("-n", cluster.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", cluster.switch, "link", "set", "br0", "up")
            for i, host in enumerate(cluster.hosts):
                # Made inside the switch namespace (names there are private), then one end moved.
                _ip("-n", cluster.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"e{i}")
                _ip("-n", cluster.switch, "link", "set", f"e{i}", "netns", host)
                _ip("-n", host, "link", "set", f"e{i}", "name", "eth0")
                _ip("-n", cluster.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", cluster.switch, "link", "set", f"p{i}", "up")
        for i, host in enumerate(cluster.hosts):
            _ip("-n", host, "addr", "add", f"{cluster.address(i)}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            if shaping.qdisc:
                _tc(host, "qdisc", "add", "dev", "eth0", "root", *shaping.qdisc)
        _save(cluster, shape)
    except BaseException:
        down(cluster.name)
        raise
    return cluster


def _start_wire(cluster: Cluster, shape: Shape, timeout: float = 20.0) -> None:
    """Start hvdinfer.wire in the switch namespace (it lives until `down` kills what runs there) and
    wait until it has made every host's eth0; its errors go to STATE_DIR/<name>-wire.log."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log = STATE_DIR / f"{cluster.name}-wire.log"
    argv = ["ip", "netns", "exec", cluster.switch, sys.executable, str(Path(__file__).with_name("wire.py")),
            "--hosts", ",".join(cluster.hosts), "--subnet", SUBNET, *shape.wire_args()]
    with open(log, "w") as errors:
        wire = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # not in the caller's process group: Ctrl-C is down()'s
    ready, _, _ = select.select([wire.stdout], [], [], timeout)
    line = wire.stdout.readline().decode() if ready else ""
    wire.stdout.close()
    if line.strip() != "ready":
        wire.kill()
        wire.wait()
        raise JobError(f"the userspace wire did not start within {timeout:.0f} s: {log.read_text().strip()[-500:]}")


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
                   state.get("shaping", ""))


def made() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def down(name: str) -> None:
    """Remove a cluster's namespaces (their links and shaping go with them) and its state; idempotent."""
    for namespace in _namespaces():
        if namespace == f"{name}-sw" or re.fullmatch(rf"{re.escape(name)}-h\d+", namespace):
            _kill_processes_in(namespace)
            _ip("netns", "del", namespace, check=False)
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)
    (STATE_DIR / f"{name}-wire.log").unlink(missing_ok=True)


def _kill_processes_in(namespace: str) -> None:
    """A namespace is only gone when nothing runs in it: end what a killed job left there."""
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def switch_cpu_seconds(cluster: Cluster) -> float:
    """CPU seconds (user + system) used so far by what runs in the switch namespace: the wire, when
    it carries the links; it shares the ranks' cores, so benchmarks report it."""
    total = 0.0
    for pid in _ip("netns", "pids", cluster.switch, check=False).stdout.split():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
        link = f", links: {cluster.shaping}" if cluster.shaping else ""
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
