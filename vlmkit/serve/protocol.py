"""The OpenAI chat-completions request, as pydantic models, and the response shapes.

:class:`ChatCompletionRequest` mirrors the fields of OpenAI's ``POST /v1/chat/completions`` that
this server implements. Unknown fields are refused, as OpenAI refuses them
(``Unrecognized request argument supplied: ...``); a few OpenAI fields are accepted only at their
neutral value (``n=1``, zero penalties, ``logprobs=false``) so a client that sends the defaults
works and one that asks for more gets a clear 400 instead of a silently ignored option.
:func:`parse_request` turns the raw body into a request or a :class:`RequestError` in OpenAI's
error shape. :func:`completion`, :func:`chunk` and :func:`usage` build the response objects.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RequestError, bad_request

__all__ = ["ChatCompletionRequest", "Message", "parse_request", "completion", "chunk", "usage", "MAX_STOP_STRINGS"]

#: OpenAI accepts up to 4 stop sequences.
MAX_STOP_STRINGS = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    """``{"url": "data:image/png;base64,..." | "https://..." | "file:///...", "detail": ...}``;
    ``detail`` ``low`` sends the image as one tile (no splitting), ``high`` splits it, ``auto``
    (default) does what the checkpoint's processor does."""

    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    """One chat message; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (see the module docstring)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        items = [value] if isinstance(value, str) else value
        if items is None:
            return None
        if len(items) > MAX_STOP_STRINGS or any(not s for s in items):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}; got {value!r}")
        return list(items)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (one choice per request); got {value}")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError(f"penalties are not supported; only 0 is accepted, got {value}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported; only false is accepted")
        return value

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (they must agree when both are given)."""
        a, b = self.max_completion_tokens, self.max_tokens
        if a is not None and b is not None and a != b:
            raise bad_request(f"max_tokens={b} and max_completion_tokens={a} disagree", "max_completion_tokens",
                              hint="send one of them (max_completion_tokens is the newer name)")  # fmt: skip
        return a if a is not None else b


# ============================================================================== parsing
def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request in ``body`` (JSON), or a 400 :class:`RequestError` in OpenAI's shape."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return request


_MEMBER = re.compile(r"[\[\]-]|^(str|int|float|bool|list|none)$")
#: The ``type`` tags of content parts: pydantic puts the tag in an error's location after the index.
_PART_TAGS = frozenset({"text", "image_url"})


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url")`` ->
    ``messages[0].content[1].image_url.url`` (union member names and part tags dropped)."""
    names = [p for p in loc if not (isinstance(p, str) and _MEMBER.search(p))]
    out: list[str] = []
    for i, part in enumerate(names):
        is_tag = part in _PART_TAGS and i > 0 and isinstance(names[i - 1], int) and i + 1 < len(names)
        if not is_tag:
            out.append(f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part))
    return "".join(out) or None


def _validation_error(exc: ValidationError) -> RequestError:
    """The most specific (deepest) pydantic error, worded as OpenAI words it."""
    errors = exc.errors(include_url=False)
    err = max(errors, key=lambda e: len(e["loc"]))
    kind, param = err["type"], _param(tuple(err["loc"]))
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err['msg']}", None, code="invalid_json",
                           hint="send a JSON object with Content-Type: application/json")  # fmt: skip
    if kind == "extra_forbidden":
        name = param.rsplit(".", 1)[-1] if param else "?"
        return bad_request(f"Unrecognized request argument supplied: {name}", param,
                           hint="see docs/serving.md for the fields this server implements")  # fmt: skip
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param)
    if kind in ("model_type", "dict_type") and not err["loc"]:
        return bad_request("the request body must be a JSON object", None)
    if kind == "value_error":  # our validators' messages name the value already
        return bad_request(f"Invalid value for '{param}': {err['msg'].removeprefix('Value error, ')}", param)
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return bad_request(f"Invalid value for '{param}': {err['msg']}; got {shown[:120]}", param)


# ============================================================================== responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(cid: str, created: int, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "usage": use}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          use: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """A ``chat.completion.chunk``: one delta (or, with ``use`` and no delta, the usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
