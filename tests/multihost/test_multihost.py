"""Multi-host runs on one machine: hosts are network namespaces made by `hvdinfer.cluster` (own
network stack and hostname each, a bridge between them), ranks launched across them by
launch/run.sh with a hostfile, over TCP. Skipped, with the reason, where namespaces cannot be made
(not root, no iproute2).

    make test-multihost
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hvdinfer import cluster as cluster_mod
from hvdinfer.runtime import LAUNCHER_GRACE_S
from models import registry
from tests import tiny, tiny_gpt

REASON = cluster_mod.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests need namespaces: {REASON}")
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
HVDINFER = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hvdinfer")


@pytest.fixture(scope="module")
def hosts():
    """2 hosts x 2 slots, up for the whole module, always torn down."""
    made = cluster_mod.up(2, 2, name=f"t{os.getpid() % 10**6}a")
    yield made
    cluster_mod.down(made.name)
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(made.name)]


def start(hosts, tmp_path, argv, launcher="mpirun", np_=4, env=None, **popen):
    """`hvdinfer ARGV` across the hosts, started; its output goes to the returned log file."""
    run_env = cluster_mod.launch_env(hosts, tmp_path, launcher, np_)
    run_env.update(ENV, **(env or {}))
    if env:
        run_env["FORWARD_ENV"] = " ".join(env)
    log = tmp_path / f"log-{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cluster_mod.command(hosts, [str(a) for a in argv]), env=run_env, stdout=out,
                                stderr=subprocess.STDOUT, **popen)
    proc.log = log
    return proc


def run(hosts, tmp_path, argv, timeout=240, **kwargs):
    proc = start(hosts, tmp_path, argv, **kwargs)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.all = proc.log.read_text(errors="replace")
    return proc


def local(np_, *argv, timeout=240):
    return subprocess.run(["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", HVDINFER,
                           *map(str, argv)], env=dict(os.environ, **ENV), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_doctor_sees_two_hosts_and_the_collectives_work(hosts, tmp_path, launcher):
    np_ = 4
    proc = run(hosts, tmp_path, ["doctor", "--selftest"], launcher=launcher, np_=np_)
    assert proc.returncode == 0, proc.all
    assert f"(size {np_}, hosts 2)" in proc.all
    assert f"host {hosts.hosts[0]}" in proc.all and f"host {hosts.hosts[1]}" in proc.all
    assert "selftest           ok" in proc.all


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "texts.jsonl"
    words = ["the", "cat", "sat", "on", "a", "mat", "dogs", "run"]
    path.write_text("".join(json.dumps({"id": i, "text": " ".join(words[: 1 + i % 8]) + f" {i}"}) + "\n"
                            for i in range(448)))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.write_model_dir(tmp_path_factory.mktemp("model") / "m", tiny.random_model(3), max_seq_length=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, texts):
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    done = local(1, "infer", "--model", model_dir, "--input", texts, "--output", out, "--chunk-size", 64, "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_bytes()


def test_infer_across_hosts_writes_the_bytes_of_one_rank(hosts, tmp_path, model_dir, texts, reference):
    out = tmp_path / "o.jsonl"
    proc = run(hosts, tmp_path, ["infer", "--model", model_dir, "--input", texts, "--output", out,
                                 "--chunk-size", 64, "--quiet"])
    assert proc.returncode == 0, proc.all
    assert out.read_bytes() == reference


def test_generate_across_hosts_equals_one_rank(hosts, tmp_path):
    config = registry.gpt_size("debug")
    model = tmp_path / "gpt"
    model.mkdir()
    tiny_gpt.write_model_dir(model, tiny_gpt.random_checkpoint(config, seed=2), config)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat {'sat ' * (i % 5)}"}) + "\n" for i in range(96)))
    args = ["generate", "--model", model, "--input", prompts, "--chunk-size", 64, "--max-new-tokens", 6,
            "--temperature", 0.8, "--seed", 4, "--quiet"]
    one = local(1, *args, "--output", tmp_path / "one.jsonl")
    assert one.returncode == 0, one.stdout + one.stderr
    proc = run(hosts, tmp_path, [*args, "--output", tmp_path / "four.jsonl"])
    assert proc.returncode == 0, proc.all
    assert (tmp_path / "four.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_a_partition_ends_the_job_in_time_naming_the_rank_and_resume_finishes(tmp_path, model_dir, texts,
                                                                               reference):
    """Host 1's link goes down mid-job: the watchdog names rank 1 within the stall timeout and the
    launcher guard ends mpirun (whose own teardown waits on the unreachable host); after the link
    is back, --resume writes the uninterrupted run's bytes."""
    pair = cluster_mod.up(2, 1, name=f"t{os.getpid() % 10**6}b")
    try:
        out, timeout = tmp_path / "p.jsonl", 10
        parts = out.with_name(out.name + ".parts")
        args = ["infer", "--model", model_dir, "--input", texts, "--output", out, "--chunk-size", 64, "--quiet"]
        proc = start(pair, tmp_path, [*args, "--stall-timeout", timeout], np_=2,
                     env={"HVDINFER_TEST_CHUNK_SECONDS": "1.0"})
        deadline = time.monotonic() + 120
        while len(list(parts.glob("chunk-*.npz"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.log.read_text()
            time.sleep(0.2)
        cluster_mod.set_link(pair, 1, "down")
        cut = time.monotonic()
        try:
            proc.wait(timeout=timeout + 15 + LAUNCHER_GRACE_S + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
        ended = time.monotonic() - cut
        text = proc.log.read_text(errors="replace")
        assert proc.returncode != 0
        assert ended <= timeout + 15 + LAUNCHER_GRACE_S, text
        stuck = [line for line in text.splitlines() if "is stuck" in line]
        assert stuck and "rank 1 of 2" in stuck[0] and pair.hosts[1] in stuck[0], text

        cluster_mod.set_link(pair, 1, "up")
        resumed = run(pair, tmp_path, [*args, "--resume"], np_=2)
        assert resumed.returncode == 0, resumed.all
        assert out.read_bytes() == reference
    finally:
        cluster_mod.down(pair.name)


PROBE = """
import json, socket, sys, time
role, address = sys.argv[1], sys.argv[2]
if role == "server":
    listener = socket.create_server((address, 5301))
    print("listening", flush=True)
    peer, _ = listener.accept()
    while data := peer.recv(1 << 20):
        if data == b"?":
            peer.sendall(b"!")
else:
    peer = socket.create_connection((address, 5301))
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(21):
        start = time.perf_counter()
        peer.sendall(b"?")
        peer.recv(1)
        rtts.append(time.perf_counter() - start)
    block, blocks = bytes(1 << 20), 24
    start = time.perf_counter()
    for _ in range(blocks):
        peer.sendall(block)
    peer.shutdown(socket.SHUT_WR)
    peer.recv(1)  # the server's close: every byte has arrived
    print(json.dumps({"rtt": sorted(rtts)[10], "bytes_per_s": blocks * len(block) / (time.perf_counter() - start)}))
"""


def test_a_shaped_link_delays_and_limits_tcp_and_a_job_runs_across_it(tmp_path, model_dir, texts, reference):
    """--delay 2ms --rate 200mbit: netem where the kernel has it, else hvdinfer.wire (no netem in
    the CI VM's kernel). A TCP round trip takes the two delays, a bulk transfer stays under the rate,
    and an infer job across the link writes the bytes of one rank."""
    shape = cluster_mod.Shape(delay="2ms", rate="200mbit")
    pair = cluster_mod.up(2, 1, shape, name=f"t{os.getpid() % 10**6}c")
    try:
        assert pair.shaping.split()[0] in ("netem", "wire") and "delay 2ms" in pair.shaping
        probe = tmp_path / "probe.py"
        probe.write_text(PROBE)
        server = subprocess.Popen(["ip", "netns", "exec", pair.hosts[1], "python3", probe, "server", pair.address(1)],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.run(["ip", "netns", "exec", pair.hosts[0], "python3", probe, "client", pair.address(1)],
                                capture_output=True, text=True, timeout=60)
        server.wait(timeout=10)
        assert client.returncode == 0, client.stderr
        measured = json.loads(client.stdout)
        assert 0.004 <= measured["rtt"] < 0.004 + 0.005, measured
        assert 0.3 * 25e6 < measured["bytes_per_s"] <= 1.05 * 25e6, measured

        out = tmp_path / "shaped.jsonl"
        proc = run(pair, tmp_path, ["infer", "--model", model_dir, "--input", texts, "--output", out,
                                    "--chunk-size", 64, "--quiet"], np_=2)
        assert proc.returncode == 0, proc.all
        assert out.read_bytes() == reference
    finally:
        cluster_mod.down(pair.name)
    assert not (cluster_mod.STATE_DIR / f"{pair.name}-wire.log").exists()


def test_data_parallel_over_hosts_with_tensor_parallel_inside_each(hosts, tmp_path, model_dir, texts, reference):
    """np 4 = dp 2 x tp 2: consecutive ranks form a tp group, so each group is one host's two slots
    and the tp allreduces stay inside a host while chunks go to both hosts."""
    out = tmp_path / "tp.jsonl"
    proc = run(hosts, tmp_path, ["infer", "--model", model_dir, "--input", texts, "--output", out,
                                 "--chunk-size", 64, "--tp", 2])
    assert proc.returncode == 0, proc.all
    assert "applied tensor parallelism: 2 ranks per group" in proc.all, proc.all
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [json.loads(line) for line in reference.decode().splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g["embedding"], w["embedding"])) < 1e-5
