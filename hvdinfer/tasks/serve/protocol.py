"""The HTTP API's shapes, as typed models: OpenAI's requests and responses for embeddings,
completions and chat (and their streamed chunks), hvdinfer's /v1/classify, and the one error shape
every failure answers with. Handlers validate requests into these and return these; nothing here
computes.

Error statuses (OpenAI's body: {"error": {"message", "type", "param", "code"}}):
  400 invalid_request_error  malformed JSON, a wrong field, a prompt that with max_tokens does not
                             fit the model's context (code context_length_exceeded; 400 as OpenAI does)
  401 authentication_error   missing or wrong `Authorization: Bearer KEY`
  404 not_found_error        a model this server does not serve (code model_not_found), an unknown path
  413 invalid_request_error  a body over --max-body-bytes
  429 rate_limit_error       the queue is full (Retry-After says when to try again)
  503 service_unavailable    shutting down, or a rank failed (the job is ending)
  504 timeout                the request took longer than --request-timeout
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """Any failure a handler answers with: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class _Request(BaseModel):
    # OpenAI's clients send fields this server does not implement (user, logit_bias, ...): accepted, unused.
    model_config = ConfigDict(extra="allow")

    model: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# --- models ---------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "hvdinfer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- embeddings and classification -----------------------------------------------------------------
class EmbeddingRequest(_Request):
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: Optional[int] = None


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassifyRequest(_Request):
    input: Union[str, list[str]]


class Classification(BaseModel):
    index: int
    label: str
    probs: list[float]
    """One probability per label, in `labels` order."""
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    labels: list[str]
    data: list[Classification]
    usage: Usage


# --- generation -------------------------------------------------------------------------------------
class _Sampling(_Request):
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    ignore_eos: bool = False

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]


def openai_finish(reason: str | None) -> str | None:
    """models.decoding's reasons in OpenAI's words: end-of-text and a stop string are both "stop"."""
    return None if reason is None else "length" if reason == "length" else "stop"


# The chat template for models that ship none (every GPT-2-layout directory): one line per turn,
# "Role: text", then "Assistant:" for the model to continue. Plain text a base LM continues well.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def chat_prompt(messages: list[ChatMessage]) -> str:
    return "".join(f"{CHAT_ROLES[m.role]}: {m.text()}\n" for m in messages) + "Assistant:"
