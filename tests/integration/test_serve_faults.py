"""`hvdinfer serve` under load and faults (mpirun -np 2, debug GPT-2, every decode iteration slowed
to 0.5 s by HVDINFER_TEST_STEP_SECONDS): a full queue answers 429 with Retry-After, a request over
--request-timeout 504 (its slot freed), and a worker frozen with SIGSTOP makes /healthz 503 at once,
the in-flight requests 503 and the whole job exit non-zero within the stall timeout, naming the rank.
In this order: the last test ends the server."""
import concurrent.futures
import os
import signal
import time

import pytest

from tests.integration.test_serve import Server, lm_dir, metric, raw  # noqa: F401

STALL_S = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, lm_dir):  # noqa: F811
    server = Server(tmp_path_factory.mktemp("serve"), lm_dir, 2, "--max-batch", "1", "--max-queue", "1",
                    "--request-timeout", "8", "--stall-timeout", STALL_S, env={"HVDINFER_TEST_STEP_SECONDS": "0.5"})
    yield server.wait_ready()
    server.close()


def complete(server, max_tokens, timeout=60):
    return raw(server, "POST", "/v1/completions", {"model": "tiny-lm", "prompt": "Hello", "max_tokens": max_tokens,
                                                    "ignore_eos": True}, timeout=timeout)


def test_a_full_queue_answers_429_with_retry_after(server):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: complete(server, 3), range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert 200 in statuses and 429 in statuses, answers
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1]["Retry-After"] == "1" and refused[2]["error"]["type"] == "rate_limit_error"


def test_a_request_over_the_timeout_gets_504_and_frees_its_slot(server):
    start = time.monotonic()
    status, _, body = complete(server, 30)
    assert status == 504 and body["error"]["type"] == "timeout", body
    assert 7 < time.monotonic() - start < 15
    deadline = time.monotonic() + 5
    while metric(server, "hvdinfer_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "hvdinfer_active_sequences") == 0


def test_a_frozen_worker_ends_the_job_and_requests_get_503(server):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending = []
        for active in (1, 2):  # one per rank, one at a time (the queue holds one)
            pending.append(pool.submit(complete, server, 14))
            deadline = time.monotonic() + 10
            while metric(server, "hvdinfer_active_sequences") < active and time.monotonic() < deadline:
                time.sleep(0.05)
        worker = server.rank_pid(1)
        frozen_at = time.monotonic()
        signal_sent = False
        try:
            os.kill(worker, signal.SIGSTOP)
            signal_sent = True
            health = 200
            while health == 200 and time.monotonic() - frozen_at < STALL_S:
                time.sleep(0.2)
                health = raw(server, "GET", "/healthz", timeout=5)[0]
            answers = [f.result(timeout=30) for f in pending]
        finally:
            code = server.proc.wait(60)
            if signal_sent:
                try:
                    os.kill(worker, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    assert health == 503  # before the job ends: rank 1 is not heard
    assert all(status == 503 for status, _, _ in answers), answers
    assert answers[0][2]["error"]["type"] == "service_unavailable"
    assert code != 0 and time.monotonic() - frozen_at < STALL_S + 20
    assert "rank 1 of 2" in server.output() and "is stuck" in server.output(), server.output()
