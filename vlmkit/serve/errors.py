"""The errors the server answers with, in OpenAI's JSON shape.

Every refusal is a :class:`RequestError` (a :class:`~vlmkit.errors.VlmkitError`): an HTTP status,
OpenAI's ``error.type`` / ``error.code``, the request field at fault (``error.param``) and a
message that names the value, the valid choices and the fix. :meth:`RequestError.body` is
``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API returns it, so every
OpenAI client raises its usual exception (``BadRequestError``, ``RateLimitError``...).
"""

from __future__ import annotations

from typing import Any

from ..errors import VlmkitError

__all__ = ["RequestError", "bad_request", "QueueFullError"]


class RequestError(VlmkitError):
    """A request the server refuses (or could not finish): ``status`` and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``: the message with its hint, as OpenAI's API shapes errors."""
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return {"error": {"message": text, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(RequestError):
    """Every slot is busy and the waiting queue is full: 429 with ``Retry-After``."""

    def __init__(self, waiting: int, max_queue: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} requests are already waiting (--max-queue {max_queue})",
            status=429, type="rate_limit_error", code="rate_limit_exceeded",
            hint=f"retry after {retry_after} s, or start the server with a larger --max-queue / --max-batch",
            headers={"Retry-After": str(retry_after)},
        )  # fmt: skip


def bad_request(message: str, param: str | None = None, *, hint: str | None = None, code: str | None = None) -> RequestError:
    """A 400 ``invalid_request_error`` about ``param``."""
    return RequestError(message, param=param, hint=hint, code=code)
