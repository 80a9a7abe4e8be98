"""Request and response bodies of `kaki serve`: Adept's `PUT /api` and the OpenAI subset.

Requests are validated here, so a bad field becomes a 400 whose body names it (app.py turns a
ValidationError into `{"error": {"message", "type", "param", "code"}}`). A validator that raises
`ParamError(field, message)` names the field itself; otherwise the field is the error's location.
Unknown keys are ignored, as both Adept's server and OpenAI's API do.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kaki.errors import ParamError

# Limits, named so the docs and the errors agree.
ADEPT_MAX_PROMPTS = 128  # as in Adept's server
ADEPT_MAX_TEMPERATURE = 100.0
ADEPT_MAX_TOP_K = 1000
MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions `logprobs`, as OpenAI
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions `top_logprobs`, as OpenAI
MAX_TEMPERATURE = 2.0  # OpenAI's range
# Every list a client sends is capped, so one request cannot make the server (or the engine's
# per-token stop checks) work in proportion to a body of millions of entries. Each cap is far above
# what a real client sends; docs/serve.md's "Limits" table lists them.
MAX_PROMPTS = 128  # /v1/completions prompts per request, as Adept's server
MAX_MESSAGES = 1024  # chat messages per request
MAX_CONTENT_PARTS = 64  # text parts per chat message
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # entries (kaki refuses any non-empty logit_bias, but reads no more than this)
MAX_SEED = 2**64 - 1  # torch.Generator's seed range
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_object(body: Any) -> Any:
    """A body sent without `Content-Type: application/json` (curl -d's default) arrives as bytes:
    read it as JSON anyway, as a client that forgot the header means it."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ParamError("body", json_error(e)) from None
    if not isinstance(body, dict):
        raise ParamError("body", "must be a JSON object")
    _check_text(body)
    return body


def json_error(e: BaseException | None) -> str:
    """What was wrong with a body that json.loads refused (`e`, its exception)."""
    if isinstance(e, UnicodeDecodeError):
        return "the request body is not valid UTF-8 (JSON bodies are UTF-8 text)"
    if isinstance(e, RecursionError):
        return "the request body's JSON is nested too deeply"
    return "the request body is not valid JSON"


def _check_text(body: dict) -> None:
    """Refuse a lone UTF-16 surrogate (JSON's "\\udfff") anywhere in the body, naming the top-level
    field: such a string has no UTF-8 form, so the tokenizer, the moderator and even the error
    response would fail on it. One walk here covers every field of every route."""
    for key, value in body.items():
        stack = [key, value]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                if _SURROGATE.search(x):
                    raise ParamError(_printable(key), "contains a lone surrogate (e.g. \"\\udfff\"), which "
                                     "is not text; send valid Unicode")
            elif isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)


def _printable(field: str) -> str:
    return _SURROGATE.sub("\ufffd", field)


# ----------------------------------------------------------------------------- Adept PUT /api

class AdeptRequest(BaseModel):
    """Adept's request fields with their defaults; the checks run in the original's order and
    say what the original said, but as HTTP 400 (the original answered most with 200)."""

    model_config = ConfigDict(extra="ignore")

    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    add_BOS: bool = False
    random_seed: int = -1  # -1: not seeded
    no_log: bool = False
    speculate: bool = True  # kaki's extra: false opts out of the server's speculative decoding

    @model_validator(mode="before")
    @classmethod
    def _check(cls, body: Any) -> Any:
        b = dict(_json_object(body))
        if "prompts" not in b:
            raise ParamError("prompts", "prompts argument required")
        if "max_len" in b:
            raise ParamError("max_len", "max_len is no longer used.  Replace with tokens_to_generate")
        if "sentences" in b:
            raise ParamError("sentences", "sentences is no longer used.  Replace with prompts")
        prompts = b["prompts"]
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ParamError("prompts", "prompts must be a string or a list of strings")
        if not prompts:
            raise ParamError("prompts", "prompts must not be an empty list")
        if len(prompts) > ADEPT_MAX_PROMPTS:
            raise ParamError("prompts", f"Maximum number of prompts is {ADEPT_MAX_PROMPTS}")
        b["prompts"] = prompts

        n = b.get("tokens_to_generate", 64)
        if not _is_int(n):
            raise ParamError("tokens_to_generate", "tokens_to_generate must be an integer greater than 0")
        if n < 0:
            raise ParamError("tokens_to_generate",
                             "tokens_to_generate must be an integer greater than or equal to 0")
        logprobs = b.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise ParamError("logprobs", "logprobs must be a boolean value")
        if n == 0 and not logprobs:
            raise ParamError("logprobs", "tokens_to_generate=0 implies logprobs should be True")
        t = b.get("temperature", 1.0)
        if not _is_number(t) or not 0.0 < t <= ADEPT_MAX_TEMPERATURE:
            raise ParamError("temperature", "temperature must be a positive number less than or equal "
                             f"to {ADEPT_MAX_TEMPERATURE}")
        k = b.get("top_k", 0)
        if not _is_int(k):
            raise ParamError("top_k", "top_k must be an integer equal to or greater than 0 and less than "
                             f"or equal to {ADEPT_MAX_TOP_K}")
        if not 0 <= k <= ADEPT_MAX_TOP_K:
            raise ParamError("top_k", f"top_k must be equal to or greater than 0 and less than or equal to "
                             f"{ADEPT_MAX_TOP_K}")
        p = b.get("top_p", 0.0)
        if not _is_number(p):
            raise ParamError("top_p", "top_p must be a positive float less than or equal to 1.0")
        if p > 0 and k > 0:
            raise ParamError("top_p", "cannot set both top-k and top-p samplings.")
        if not 0 <= p <= 1:
            raise ParamError("top_p", "top_p must be less than or equal to 1.0")
        if not isinstance(b.get("add_BOS", False), bool):
            raise ParamError("add_BOS", "add_BOS must be a boolean value")
        seed = b.get("random_seed", -1)
        if not _is_int(seed):
            raise ParamError("random_seed", "random_seed must be integer")
        if seed < 0 and seed != -1:
            raise ParamError("random_seed", "random_seed must be a positive integer")
        if seed > MAX_SEED:
            raise ParamError("random_seed", f"random_seed must be at most 2**64-1 ({MAX_SEED})")
        if not isinstance(b.get("no_log", False), bool):
            raise ParamError("no_log", "no_log must be a boolean value")
        if not isinstance(b.get("speculate", True), bool):
            raise ParamError("speculate", "speculate must be a boolean value")
        if any(len(p) == 0 for p in prompts) and not b.get("add_BOS", False):
            raise ParamError("prompts", "Empty prompts require add_BOS=true")
        return b


class Moderation(BaseModel):
    """kaki's extra with `kaki serve --moderation`: the check that decided an answer. `where` is
    "input" (the prompt or a user message was blocked, or, unblocked, the last one checked) or
    "output" (the reply); `label` and `score` are the moderation model's deciding label and its
    probability."""

    where: Literal["input", "output"]
    label: str
    score: float
    blocked: bool


class AdeptResponse(BaseModel):
    text: list[str]
    logprobs: list[list[float]] | None
    generations: list[str]
    human_readable_tokens: list[list[str]]
    # kaki's extra, only with --moderation: one per prompt (a blocked prompt's generation is the refusal).
    moderation: list[Moderation] | None = None


# ----------------------------------------------------------------------------- OpenAI

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    """Fields both OpenAI routes share. Strict: "5" is not a number, 1 is not true; NaN and
    Infinity (which Python's JSON reader accepts) are not numbers either."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None
    # Accepted only at their neutral values: kaki does not implement them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    # vLLM's extra sampling fields (the openai client sends them with extra_body).
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # kaki's extra: false decodes this request without speculation (`kaki serve --speculate`/--draft-model).
    speculate: bool = True

    @model_validator(mode="before")
    @classmethod
    def _body(cls, body: Any) -> Any:
        return _json_object(body)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ParamError("stop", "must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ParamError("stop", f"has {len(v)} strings; at most {MAX_STOP} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in v):
            raise ParamError("stop", f"has a string over {MAX_STOP_CHARS:,} characters; at most {MAX_STOP_CHARS:,} are allowed")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, v):
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ParamError("logit_bias", f"has {len(v):,} entries; at most {MAX_LOGIT_BIAS} are allowed")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ParamError(name, "is not supported by kaki serve; leave it at 0 (repetition_penalty "
                                 "is supported)")
        if self.logit_bias:
            raise ParamError("logit_bias", "is not supported by kaki serve")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "is only allowed when stream is true")
        return self


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        ok = (isinstance(v, str)
              or (isinstance(v, list) and v and (all(isinstance(p, str) for p in v)
                                                 or all(_is_int(t) for t in v)
                                                 or all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                        for p in v))))
        if not ok:
            raise ParamError("prompt", "must be a string, a list of strings, a list of token ids or a "
                             "list of lists of token ids (none of them empty)")
        if not isinstance(v, str) and not _is_int(v[0]) and len(v) > MAX_PROMPTS:
            raise ParamError("prompt", f"has {len(v)} prompts; at most {MAX_PROMPTS} are allowed per request")
        return v

    @model_validator(mode="after")
    def _completion_only(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "is not supported by kaki serve (leave it unset or equal to n)")
        if self.suffix:
            raise ParamError("suffix", "is not supported by kaki serve")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and _is_int(p[0])):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=0)  # None: as many as fit
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    # kaki's extra: with `kaki serve --retrieval INDEX`, false answers without retrieved passages.
    retrieval: bool = True

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "needs logprobs: true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ParamError("response_format", "only {\"type\": \"text\"} is supported by kaki serve")
        if self.tools:
            raise ParamError("tools", "tool calling is not supported by kaki serve")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ----------------------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    moderation: Moderation | None = None  # kaki's extra with --moderation (on a stream's last chunk)


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    moderation: Moderation | None = None  # kaki's extra with --moderation


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # kaki's extra: the passages put into the prompt (`kaki serve --retrieval`), best first.
    sources: list[dict] | None = None


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    moderation: Moderation | None = None  # kaki's extra with --moderation, on the choice's last chunk


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[dict] | None = None  # kaki's extra, on the first chunk (see ChatCompletionResponse)


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "kaki"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | int | None = None) -> dict:
    """OpenAI's error shape, used by every route (Adept's too: a JSON object, not a bare string)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
