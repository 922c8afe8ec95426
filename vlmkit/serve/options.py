"""The server's settings (:class:`ServeOptions`), validated once, where the server is made.

Every field is a ``vlmkit serve`` option of the same name (``max_batch`` is ``--max-batch``); a
bad value is a :class:`~vlmkit.errors.VlmkitError` that names the option, the value and the
valid range, before the model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import VlmkitError

__all__ = ["ServeOptions", "check_options"]

MiB = 1024 * 1024


class ServeOptions(BaseModel):
    """``vlmkit serve`` options; see docs/serving.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_key: str | None = Field(None, min_length=1, description="Require `Authorization: Bearer KEY` on /v1/*.")
    max_batch: int = Field(8, ge=1, le=1024, description="Most requests decoded together.")
    max_queue: int = Field(64, ge=0, description="Most requests waiting for a slot; more get 429.")
    request_timeout: float | None = Field(600.0, gt=0, description="Seconds from arrival to the last token.")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs.")
    image_root: Path | None = Field(None, description="Folder whose files may be sent as file:// URLs.")
    max_images: int | None = Field(None, ge=0, description="Images per request (default: single tiles that fit the context).")
    max_image_bytes: int = Field(20 * MiB, ge=1, description="Encoded bytes per image.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Decoded width x height per image.")
    max_body_bytes: int = Field(100 * MiB, ge=1024, description="Request body size (base64 images included).")
    model_name: str | None = Field(None, min_length=1, description="The `model` id clients send (default: SOURCE).")

    @field_validator("image_root")
    @classmethod
    def _existing_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{str(value)!r} is not a folder")
        return None if value is None else Path(value).resolve()


def check_options(**values: Any) -> ServeOptions:
    """:class:`ServeOptions` from keyword values, or a :class:`VlmkitError` naming the ``--option``."""
    try:
        return ServeOptions(**values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        flag = "--" + name.replace("_", "-")
        raise VlmkitError(f"{flag}: {err['msg'].removeprefix('Value error, ')}; got {err.get('input')!r}",
                          hint=f"see `vlmkit serve --help` for {flag}") from None  # fmt: skip
