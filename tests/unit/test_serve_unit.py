"""The serving pieces that need no ranks: stream deltas that never send a partial stop string or a
half character, the chat template, the error body, the server's settings checks, and the router's
batching (texts batched by size and wait, sequences placed on the least-loaded rank) on rank 0 alone."""
import asyncio

import numpy as np
import pytest

from hvdinfer.runtime import JobError
from hvdinfer.tasks.serve import ServeConfig
from hvdinfer.tasks.serve.app import CountRequests, TextDeltas
from hvdinfer.tasks.serve.protocol import APIError, ChatMessage, chat_prompt, openai_finish
from hvdinfer.tasks.serve.router import Router


def test_text_deltas_hold_back_partial_stop_strings_and_characters():
    deltas = TextDeltas(("\nUser:",))
    assert deltas.next(" Hello", False) == " Hello"
    assert deltas.next(" Hello\nUs", False) == ""  # may become the stop string
    assert deltas.next(" Hello\nUsually", False) == "\nUsually"
    assert deltas.next(" Hello\nUsually caf\ufffd", False) == " caf"  # half of a character
    assert deltas.next(" Hello\nUsually café", True) == "é"
    assert deltas.sent == " Hello\nUsually café"


def test_chat_template_and_finish_reasons():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", content=[{"type": "text", "text": "Hello"}])]
    assert chat_prompt(messages) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nAssistant:"
    assert [openai_finish(r) for r in ("length", "stop", "eos", None)] == ["length", "stop", "stop", None]


def test_error_body_has_openai_shape():
    error = APIError(429, "full", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    assert error.body() == {"error": {"message": "full", "type": "rate_limit_error", "param": None,
                                      "code": "queue_full"}}


@pytest.mark.parametrize("field, value, message", [
    ("port", 70000, "--port"), ("max_batch", 0, "--max-batch"), ("request_timeout", 0, "--request-timeout"),
    ("batching", "eager", "--batching"), ("api_key", "", "--api-key")])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(JobError, match=message):
        ServeConfig(model="m", **{field: value})


def test_router_batches_texts_and_answers_each_request():
    async def main():
        router = Router(None, 1, max_batch=4, max_wait_s=0.05, max_queue=6).start()
        router.rank0_send(("ready", 0))
        first = router.submit_texts("embed", ["a", "b", "c"])
        second = router.submit_texts("embed", ["d", "e"])
        with pytest.raises(APIError) as full:
            router.submit_texts("embed", ["f", "g"])
        assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
        sizes = []
        while len(sizes) < 2:  # play rank 0: answer each batch with the texts' lengths
            message = router.rank0_receive()
            if message is None:
                await asyncio.sleep(0.005)
                continue
            _, batch_id, task, texts = message
            sizes.append(len(texts))
            router.rank0_send(("texts", batch_id, np.array([[ord(t)] for t in texts], np.float32), [1] * len(texts)))
        assert sizes == [4, 1]  # a full batch at once, the rest after max_wait
        values, tokens = await first
        assert values[:, 0].tolist() == [97, 98, 99] and tokens == [1, 1, 1]
        assert (await second)[0][:, 0].tolist() == [100, 101]
        router.drain()
        assert router.rank0_receive() in (None, ("stop",))
    asyncio.run(main())


def test_request_counting_notes_each_v1_status_and_passes_responses_through():
    async def app(scope, receive, send):
        if scope["path"] == "/v1/boom":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 404 if scope["path"] == "/v1/nope" else 200})
        await send({"type": "http.response.body", "body": b"{}"})

    seen, sent = [], []

    async def send(message):
        sent.append(message)

    async def main():
        counting = CountRequests(app, lambda path, started, status: seen.append((path, status)))
        for path in ("/v1/embeddings", "/v1/nope", "/healthz"):
            await counting({"type": "http", "path": path}, None, send)
        with pytest.raises(RuntimeError):
            await counting({"type": "http", "path": "/v1/boom"}, None, send)

    asyncio.run(main())
    assert seen == [("/v1/embeddings", 200), ("/v1/nope", 404), ("/v1/boom", 500)]  # /healthz is not counted
    assert [m.get("status") for m in sent] == [200, None, 404, None, 200, None]
