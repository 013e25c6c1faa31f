"""The HTTP app: one handler per endpoint, each reading a typed request (protocol.py), asking the
router for the work and answering a typed response; every error leaves through `APIError` and one
handler that writes OpenAI's error body. No model code here: prompts are tokenised (to check them
against the context before they queue) and continuations detokenised on the ranks.

    GET  /healthz                ready only when every rank has loaded the model and is heard
    GET  /metrics                Prometheus text
    GET  /v1/models              the served model
    POST /v1/embeddings          embedders and classifiers
    POST /v1/classify            classifiers: {"model", "input": str | [str]} -> label + probs per input
    POST /v1/completions         GPT-2-layout models; "stream": true for server-sent events
    POST /v1/chat/completions    GPT-2-layout models through protocol.chat_prompt's template
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import os
import time
from typing import Any, AsyncIterator, Callable

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hvdinfer.tasks.serve import protocol as p
from hvdinfer.tasks.serve.protocol import APIError

MAX_INPUTS = 2048
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass
class ServerState:
    """What the handlers talk to."""

    name: str
    names: set[str]
    kind: str
    endpoints: set[str]
    context: int
    labels: list[str] | None
    tokenizer: Any
    """Decoders: the BPE tokenizer, to count and check prompts; None for text models."""
    router: Any
    metrics: Any
    health: Callable[[], tuple[bool, dict]]
    ranks: Callable[[], dict[int, tuple[float, bool]]]
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 60.0


# --- request plumbing -------------------------------------------------------------------------------
def check_auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Constant time: the comparison does not reveal how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                       code="invalid_api_key")


async def read_request(state: ServerState, request: Request, model: type[BaseModel], endpoint: str):
    """Auth, body size, JSON, the typed request, the model name and the endpoint, in that order."""
    check_auth(state, request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise APIError(413, f"the request body is {declared} bytes; at most {state.max_body_bytes}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body_bytes:
            raise APIError(413, f"the request body is over {state.max_body_bytes} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}", param=where or None, code="invalid_value") from None
    if parsed.model not in state.names:
        raise APIError(404, f"the model '{parsed.model}' does not exist; this server serves '{state.name}'",
                       "not_found_error", param="model", code="model_not_found")
    if endpoint not in state.endpoints:
        raise APIError(400, f"the model '{state.name}' ({state.kind}) does not serve /v1/{endpoint}; it serves "
                            f"{', '.join('/v1/' + e for e in sorted(state.endpoints))}", param="model",
                       code="unsupported_endpoint")
    return parsed


async def wait_for(state: ServerState, awaitable, deadline: float):
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise APIError(504, f"the request took longer than {state.request_timeout_s:g} s", "timeout",
                       code="timeout") from None


def _inputs(value) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", param="input")
    return texts


# --- generation plumbing -----------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    prompt: list[int]
    params: dict


def prepare(state: ServerState, text: str, request: p._Sampling, max_tokens: int | None) -> Prepared:
    """Token ids and sampling settings of one prompt, or a 400 naming what does not fit."""
    from models.decoding import SamplingParams

    prompt = state.tokenizer.encode(text) or [state.tokenizer.eos_id]  # an empty prompt follows end-of-text
    room = state.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; the model's context is {state.context} tokens "
                            f"and leaves no room for a completion", param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    if len(prompt) + max_tokens > state.context:
        raise APIError(400, f"this model's maximum context length is {state.context} tokens; the prompt has "
                            f"{len(prompt)} and max_tokens asks for {max_tokens} more ({len(prompt) + max_tokens})",
                       param="max_tokens", code="context_length_exceeded")
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    params = dict(max_new_tokens=max_tokens, temperature=request.temperature, top_k=request.top_k,
                  top_p=request.top_p, seed=seed, stop=request.stops(), ignore_eos=request.ignore_eos)
    try:
        SamplingParams(**params)
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc)) from None
    return Prepared(prompt, params)


class TextDeltas:
    """The text a stream may send so far: the continuation minus a trailing partial character and
    anything that may still turn into a stop string (cut off when it does)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.sent = stops, ""

    def next(self, text: str, finished: bool) -> str:
        safe = text
        if not finished:
            safe = safe.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
            safe = safe[:len(safe) - hold]
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta


async def collect(state: ServerState, sequence, deadline: float) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of a sequence; cancelled on a timeout or an error."""
    tokens = 0
    try:
        while True:
            event = await wait_for(state, sequence.events.get(), deadline)
            if isinstance(event, APIError):
                raise event
            tokens += len(event.tokens)
            if event.finish_reason is not None:
                return event.text, tokens, event.finish_reason
    except BaseException:
        state.router.cancel(sequence)
        raise


async def stream_events(state: ServerState, sequence, stops: tuple[str, ...], deadline: float,
                        ) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, OpenAI finish reason or None) as the rank decodes; a client that goes away
    (the response's task is cancelled) frees the sequence's slot."""
    deltas, finished = TextDeltas(stops), False
    try:
        while True:
            event = await wait_for(state, sequence.events.get(), deadline)
            if isinstance(event, APIError):
                raise event
            finished = event.finish_reason is not None
            delta = deltas.next(event.text, finished)
            if delta or finished:
                yield delta, p.openai_finish(event.finish_reason)
            if finished:
                return
    finally:
        if not finished:
            state.router.cancel(sequence)


def sse(payload: BaseModel | dict | str) -> bytes:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n".encode()


async def sse_stream(state: ServerState, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Server-sent events; an error after the first byte can only be told as an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield sse(exc.body())
    yield b"data: [DONE]\n\n"


class CountRequests:
    """Latency and status of every /v1 request, as plain ASGI: Starlette's BaseHTTPMiddleware runs
    each request through extra tasks and memory streams, which cost more than the handler itself."""

    def __init__(self, app, observe: Callable[[str, float, int], None]):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), 500

        async def noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.observe(scope["path"], started, status)


# --- the app ---------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="hvdinfer", docs_url=None, redoc_url=None, openapi_url=None)

    def observe(endpoint: str, started: float, status: int) -> None:
        state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        state.metrics.requests.labels(endpoint, str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    app.add_middleware(CountRequests, observe=observe)

    @app.get("/healthz")
    async def healthz():
        ok, detail = state.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **detail}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.render(state.router.depth(), state.router.active_sequences(), state.ranks)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(state, request)
        return p.ModelList(data=[p.ModelCard(id=state.name)])

    async def texts(request: Request, model: type[BaseModel], endpoint: str, task: str):
        req = await read_request(state, request, model, endpoint)
        inputs = _inputs(req.input)
        deadline = time.monotonic() + state.request_timeout_s
        values, tokens = await wait_for(state, state.router.submit_texts(task, inputs), deadline)
        return req, values, tokens

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req, values, tokens = await texts(request, p.EmbeddingRequest, "embeddings", "embed")
        if req.dimensions is not None and req.dimensions != values.shape[1]:
            raise APIError(400, f"dimensions: this model's embeddings have {values.shape[1]}", param="dimensions")
        if req.encoding_format == "base64":
            data = [base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode() for v in values]
        else:
            data = list(values)
        usage = p.Usage(prompt_tokens=sum(tokens), total_tokens=sum(tokens))
        # p.EmbeddingResponse's shape, written by orjson straight from the float32 rows: through pydantic,
        # boxing every float costs more than the model's forward pass on short texts.
        body = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e}
                                           for i, e in enumerate(data)],
                "model": state.name, "usage": usage.model_dump(exclude_none=True)}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.post("/v1/classify")
    async def classify(request: Request):
        req, values, tokens = await texts(request, p.ClassifyRequest, "classify", "classify")
        data = [p.Classification(index=i, label=state.labels[int(np.argmax(row))], probs=row.tolist(),
                                 num_classes=len(state.labels)) for i, row in enumerate(values)]
        usage = p.Usage(prompt_tokens=sum(tokens), total_tokens=sum(tokens))
        return p.ClassifyResponse(model=state.name, labels=state.labels, data=data, usage=usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(state, request, p.CompletionRequest, "completions")
        prompts = _inputs(req.prompt)
        if req.stream and len(prompts) > 1:
            raise APIError(400, "stream: one prompt per streamed request", param="prompt")
        max_tokens = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        prepared = [prepare(state, text, req, max_tokens) for text in prompts]
        deadline = time.monotonic() + state.request_timeout_s
        ident = p.new_id("cmpl")
        sequences = [state.router.submit_sequence(x.prompt, x.params, 0) for x in prepared]
        if req.stream:
            async def chunks():
                if req.echo:
                    yield sse(p.CompletionResponse(id=ident, model=state.name,
                                                   choices=[p.CompletionChoice(text=prompts[0])]))
                async for delta, finish in stream_events(state, sequences[0], req.stops(), deadline):
                    yield sse(p.CompletionResponse(id=ident, model=state.name,
                                                   choices=[p.CompletionChoice(text=delta, finish_reason=finish)]))
            return StreamingResponse(sse_stream(state, chunks()), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(collect(state, s, deadline) for s in sequences))
        except BaseException:
            for s in sequences:
                state.router.cancel(s)
            raise
        choices = [p.CompletionChoice(index=i, text=(prompts[i] if req.echo else "") + text,
                                      finish_reason=p.openai_finish(reason))
                   for i, (text, _, reason) in enumerate(results)]
        prompt_tokens = sum(len(x.prompt) for x in prepared)
        completion_tokens = sum(n for _, n, _ in results)
        return p.CompletionResponse(id=ident, model=state.name, choices=choices, usage=p.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_request(state, request, p.ChatRequest, "chat")
        prepared = prepare(state, p.chat_prompt(req.messages), req, req.max_completion_tokens or req.max_tokens)
        deadline = time.monotonic() + state.request_timeout_s
        ident = p.new_id("chatcmpl")
        sequence = state.router.submit_sequence(prepared.prompt, prepared.params, 0)
        if req.stream:
            async def chunks():
                first = p.ChatChunk(id=ident, model=state.name,
                                    choices=[p.ChatChunkChoice(delta=p.DeltaMessage(role="assistant", content=""))])
                yield sse(first)
                async for delta, finish in stream_events(state, sequence, req.stops(), deadline):
                    yield sse(p.ChatChunk(id=ident, model=state.name, choices=[p.ChatChunkChoice(
                        delta=p.DeltaMessage(content=delta or None), finish_reason=finish)]))
            return StreamingResponse(sse_stream(state, chunks()), media_type="text/event-stream")
        text, completion_tokens, reason = await collect(state, sequence, deadline)
        usage = p.Usage(prompt_tokens=len(prepared.prompt), completion_tokens=completion_tokens,
                        total_tokens=len(prepared.prompt) + completion_tokens)
        return p.ChatResponse(id=ident, model=state.name, usage=usage, choices=[p.ChatChoice(
            message=p.AssistantMessage(content=text), finish_reason=p.openai_finish(reason))])

    return app
