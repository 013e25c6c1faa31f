"""`hvdinfer serve` of a debug-size classifier directory (an embedder with a head) under mpirun -np 2:
/v1/embeddings through the `openai` client (float and base64) and /v1/classify equal `hvdinfer
infer`'s outputs for the same texts; concurrent requests are batched together over both ranks."""
import base64
import concurrent.futures
import time

import numpy as np
import psutil
import pytest

from tests.integration.test_infer import classifier_dir, good_input, read_jsonl, run_hvdinfer, texts  # noqa: F401
from tests.integration.test_serve import Server, metric, raw

LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, classifier_dir):  # noqa: F811
    server = Server(tmp_path_factory.mktemp("serve"), classifier_dir, 2, "--max-batch", "8", "--max-wait-ms", "20")
    yield server.wait_ready()
    server.close()


@pytest.fixture(scope="module")
def offline(tmp_path_factory, classifier_dir, good_input):  # noqa: F811
    """`hvdinfer infer` embeddings and class scores for the same texts."""
    out = tmp_path_factory.mktemp("infer")
    results = {}
    for task in ("embed", "classify"):
        proc = run_hvdinfer("infer", 1, "--model", classifier_dir, "--task", task, "--input", good_input,
                            "--output", out / f"{task}.jsonl", "--quiet")
        assert proc.returncode == 0, proc.all
        results[task] = read_jsonl(out / f"{task}.jsonl")
    return results


def test_embeddings_equal_hvdinfer_infer(server, offline, texts):  # noqa: F811
    want = np.array([row["embedding"] for row in offline["embed"]])
    client = server.client(api_key="unused")
    got = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in got.data] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    assert got.usage.prompt_tokens > len(texts)
    as_base64 = client.embeddings.create(model="m", input=texts[:3], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in as_base64.data]  # the client leaves it
    np.testing.assert_allclose(np.array(decoded), want[:3], atol=1e-5)
    single = client.embeddings.create(model="m", input=texts[4])
    np.testing.assert_allclose(single.data[0].embedding, want[4], atol=1e-5)


def test_concurrent_requests_are_batched_over_both_ranks(server, offline, texts):  # noqa: F811
    want = np.array([row["embedding"] for row in offline["embed"]])
    client = server.client(api_key="unused")
    before = metric(server, "hvdinfer_batch_size_count")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda t: client.embeddings.create(model="m", input=t).data[0].embedding, texts))
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)
    batches = metric(server, "hvdinfer_batch_size_count") - before
    assert batches < len(texts)  # some requests shared a batch


def test_classify_equals_hvdinfer_infer(server, offline, texts):  # noqa: F811
    status, _, body = raw(server, "POST", "/v1/classify", {"model": "m", "input": texts})
    assert status == 200, body
    assert body["labels"] == LABELS and [d["index"] for d in body["data"]] == list(range(len(texts)))
    want = np.array([[row["scores"][label] for label in LABELS] for row in offline["classify"]])
    np.testing.assert_allclose(np.array([d["probs"] for d in body["data"]]), want, atol=1e-5)
    assert [d["label"] for d in body["data"]] == [row["label"] for row in offline["classify"]]


def test_text_model_errors(server):
    status, _, body = raw(server, "POST", "/v1/completions", {"model": "m", "prompt": "a"})
    assert status == 400 and body["error"]["code"] == "unsupported_endpoint"
    status, _, body = raw(server, "POST", "/v1/embeddings", {"model": "m", "input": []})
    assert status == 400 and body["error"]["param"] == "input"
    status, _, body = raw(server, "POST", "/v1/embeddings", {"model": "m", "input": "a", "dimensions": 3})
    assert status == 400 and body["error"]["param"] == "dimensions"


def test_an_idle_server_leaves_the_cores_alone(server):
    """Horovod's background thread is stopped once serving starts: under the MPI controller it
    negotiated with its peer every cycle and spun while waiting, about half a core per rank."""
    ranks = [psutil.Process(server.rank_pid(r)) for r in (0, 1)]
    time.sleep(1.0)  # the last test's requests are answered

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in ranks)

    before, start = cpu(), time.monotonic()
    time.sleep(4.0)
    cores = (cpu() - before) / (time.monotonic() - start)
    assert cores < 0.3, f"an idle 2-rank server used {cores:.2f} cores"


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--pp", "2", "--micro-batches", "2")], ids=["tp2", "pp2"])
def test_a_model_parallel_server_classifies_and_embeds_as_hvdinfer_infer(tmp_path, classifier_dir, offline,  # noqa: F811
                                                                         texts, flags):  # noqa: F811
    """--tp 2: both ranks are one group, the leader serving and the other repeating its forwards;
    --pp 2: each of the two ranks runs the model as two stages on two devices. Class scores and
    embeddings both equal infer's."""
    server = Server(tmp_path, classifier_dir, 2, "--max-batch", "4", *flags)
    try:
        server.wait_ready()
        status, _, health = raw(server, "GET", "/healthz")
        assert status == 200 and health["down"] == []  # under --tp the follower is heard too
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: raw(server, "POST", "/v1/classify", {"model": "m", "input": t}),
                                    [texts[:5], texts[5:], texts[:1], texts[1:3]]))
        assert [status for status, _, _ in answers] == [200] * 4, answers
        got = np.array([d["probs"] for _, _, body in answers[:2] for d in body["data"]])
        want = np.array([[row["scores"][label] for label in LABELS] for row in offline["classify"]])
        np.testing.assert_allclose(got, want, atol=1e-5)
        embedded = server.client(api_key="unused").embeddings.create(model="m", input=texts, encoding_format="float")
        np.testing.assert_allclose([d.embedding for d in embedded.data],
                                   [row["embedding"] for row in offline["embed"]], atol=1e-5)
    finally:
        server.close()
