"""`hvdinfer serve` of a debug-size GPT-2 directory under mpirun -np 2, driven over real HTTP by the
official `openai` client and by raw requests: completions and chat (plain and streamed), greedy
outputs equal to `hvdinfer generate`, auth, every request error, a client leaving mid-stream, the
health and metrics endpoints, and (last) a graceful shutdown with a request in flight.

The helpers (Server, free_port, raw) are shared by test_serve_text.py and test_serve_faults.py."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

from models import registry
from tests import tiny_gpt
from tests.integration.test_infer import ENV, hvdinfer_cmd, read_jsonl, run_hvdinfer

KEY = "test-key-123"
PROMPTS = ["Hello world", "the cat sat on", " the dog and a", "Hello"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`hvdinfer serve` under mpirun, its log in a file; ready once /healthz says so."""

    def __init__(self, tmp: Path, model: Path, np_: int, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        cmd = hvdinfer_cmd("serve", np_, "--model", model, "--port", self.port, *args)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=dict(ENV, **(env or {})), stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 240) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if raw(self, "GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready in {timeout} s:\n{self.output()}")

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank) and "serve" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError(f"no rank {rank} process")

    def client(self, api_key: str = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def raw(server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
        timeout: float = 60):
    """(status, headers (case-insensitive), parsed JSON or text) of one plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, head, text = exc.code, exc.headers, exc.read().decode()
    try:
        return status, head, json.loads(text)
    except json.JSONDecodeError:
        return status, head, text


AUTH = {"Authorization": f"Bearer {KEY}"}


def metric(server, name: str) -> float:
    text = raw(server, "GET", "/metrics")[2]
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return tiny_gpt.write_model_dir(tmp_path_factory.mktemp("lm") / "tiny-lm",
                                    tiny_gpt.random_checkpoint(registry.gpt_size("debug"), seed=5))


@pytest.fixture(scope="module")
def server(tmp_path_factory, lm_dir):
    server = Server(tmp_path_factory.mktemp("serve"), lm_dir, 2, "--api-key", KEY, "--max-batch", "2",
                    "--max-body-bytes", "4096")
    yield server.wait_ready()
    server.close()


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny-lm"]
    status, _, body = raw(server, "GET", "/healthz")
    assert status == 200 and body["ready"] == [0, 1]
    assert metric(server, "hvdinfer_rank_up") == 2


@pytest.fixture(scope="module")
def greedy(lm_dir, tmp_path_factory) -> list[str]:
    """`hvdinfer generate`'s greedy continuations of PROMPTS, 12 tokens at most."""
    tmp = tmp_path_factory.mktemp("generate")
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    proc = run_hvdinfer("generate", 1, "--model", lm_dir, "--input", src, "--output", tmp / "out.jsonl",
                        "--temperature", "0", "--max-new-tokens", "12", "--quiet")
    assert proc.returncode == 0, proc.all
    return [row["text"] for row in read_jsonl(tmp / "out.jsonl")]


def concurrent_completions(client, prompts: list[str]) -> list:
    """One greedy completion request per prompt, all at once: they share the ranks' slots."""
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model="tiny-lm", prompt=prompts[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_greedy_completions_equal_hvdinfer_generate(server, lm_dir, greedy):
    want, client = greedy, server.client()
    results = concurrent_completions(client, PROMPTS)
    assert [r.choices[0].text for r in results] == want
    assert all(r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("length", "stop") for r in results)
    # Streamed, the pieces add up to the same text; and one request may carry several prompts.
    stream = client.completions.create(model="tiny-lm", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want[0] and chunks[-1].choices[0].finish_reason
    both = client.completions.create(model=str(lm_dir), prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in both.choices] == want[:2]


def test_chat_plain_and_streamed(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]
    reply = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 6
    streamed = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == reply.choices[0].message.content
    seeded = [client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6, seed=4,
                                             temperature=1.0).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_auth(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    status, _, body = raw(server, "POST", "/v1/completions", {"model": "tiny-lm", "prompt": "a"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert raw(server, "GET", "/healthz")[0] == 200  # probes need no key


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "tiny-lm", "prompt": ', 400, "invalid_json"),
    ({"model": "tiny-lm"}, 400, "invalid_value"),
    ({"model": "tiny-lm", "prompt": "a", "temperature": -1}, 400, "invalid_value"),
    ({"model": "nope", "prompt": "a"}, 404, "model_not_found"),
    ({"model": "tiny-lm", "prompt": "a" * 5000}, 413, "request_too_large"),
    ({"model": "tiny-lm", "prompt": "the cat", "max_tokens": 500}, 400, "context_length_exceeded"),
    ({"model": "tiny-lm", "prompt": " the" * 200}, 400, "context_length_exceeded"),
    ({"model": "tiny-lm", "input": "a"}, 400, "invalid_value"),
], ids=["malformed-json", "missing-prompt", "bad-temperature", "unknown-model", "too-large", "max-tokens",
        "prompt-over-context", "wrong-shape"])
def test_request_errors_in_openai_shape(server, body, status, code):
    got, _, answer = raw(server, "POST", "/v1/completions", body, AUTH)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["code"] == code


def test_errors_through_the_client(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-lm", prompt="a", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.embeddings.create(model="tiny-lm", input="a")
    assert raw(server, "GET", "/v1/nothing", headers=AUTH)[2]["error"]["type"] == "not_found_error"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    client = server.client()
    stream = client.completions.create(model="tiny-lm", prompt="Hello", max_tokens=100, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while metric(server, "hvdinfer_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "hvdinfer_active_sequences") == 0
    assert client.completions.create(model="tiny-lm", prompt="a", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--pp", "2", "--micro-batches", "2")], ids=["tp2", "pp2"])
def test_a_model_parallel_server_completes_as_hvdinfer_generate(tmp_path, lm_dir, greedy, flags):
    """--tp 2: both ranks are one group (the leader decodes, the other repeats each prefill and step);
    --pp 2: each rank decodes through two stages on two devices. Then SIGTERM: every rank exits 0."""
    server = Server(tmp_path, lm_dir, 2, "--max-batch", "3", *flags)
    try:
        server.wait_ready()
        status, _, health = raw(server, "GET", "/healthz")
        assert status == 200 and health["down"] == []
        results = concurrent_completions(server.client(), PROMPTS)  # four sequences in three slots per rank
        assert [r.choices[0].text for r in results] == greedy
        chunks = list(server.client().completions.create(model="tiny-lm", prompt=PROMPTS[2], max_tokens=12,
                                                         temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == greedy[2]
        os.kill(server.rank_pid(0), signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.output()
    finally:
        server.close()


def test_graceful_shutdown_finishes_the_request_in_flight(server):
    """Last in this file: SIGTERM to the coordinator; the long request still gets its full answer,
    new connections are refused, every rank exits 0."""
    result = {}

    def long_request():
        result["r"] = server.client().completions.create(model="tiny-lm", prompt="Hello", max_tokens=100,
                                                         extra_body={"ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 20
    while not metric(server, "hvdinfer_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(server.rank_pid(0), signal.SIGTERM)
    thread.join(60)
    assert len(result["r"].choices[0].text) > 0 and result["r"].usage.completion_tokens == 100
    assert server.proc.wait(60) == 0, server.output()
    with pytest.raises(OSError):
        raw(server, "GET", "/healthz", timeout=5)
    assert "SIGTERM: no new connections" in server.output() and "Traceback" not in server.output()
