"""Images from a chat request's ``image_url`` parts, checked before any pixel is decoded.

Three kinds of URL:

- ``data:image/png;base64,...`` (PNG, JPEG or WebP): the encoded length is checked against the
  byte limit before the base64 is decoded, and malformed base64 is refused;
- ``http(s)://``: refused unless the server runs with ``--allow-remote-images``; then fetched
  with a timeout, stopping at the byte limit;
- ``file:///path``: only under ``--image-root DIR`` (the resolved path, symlinks followed, must
  stay inside it).

Then the header alone (``PIL.Image.open`` reads no pixels) gives the format and the size: a
format other than PNG/JPEG/WebP, or more pixels than the limit (a decompression bomb), is refused
before ``load()`` decodes anything. Every refusal is a 400 :class:`RequestError` naming the
image (``messages[i].content[j]``), the value, the limit and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from .errors import RequestError, bad_request

__all__ = ["ImageLimits", "FORMATS", "load_image"]

#: Accepted formats: PIL's name -> media type.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ImageLimits:
    """``max_bytes`` per encoded image, ``max_pixels`` (width x height) per image; remote URLs
    and a local ``root`` folder for ``file://`` are off unless set."""

    max_bytes: int
    max_pixels: int
    allow_remote: bool = False
    root: Path | None = None
    fetch_timeout_s: float = 10.0


def load_image(url: str, where: str, limits: ImageLimits) -> Image.Image:
    """The decoded RGB-or-other-mode PIL image of ``url`` (see the module docstring)."""
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        data, declared = _from_data_url(url, where, limits)
    elif scheme in ("http", "https"):
        data, declared = _from_remote(url, where, limits), None
    elif scheme == "file":
        data, declared = _from_file(url, where, limits), None
    else:
        raise bad_request(f"{where}: unsupported image URL {url[:60]!r}", where,
                          hint="send a data:image/png;base64,... URL (PNG, JPEG or WebP)")  # fmt: skip
    return _decode(data, declared, where, limits)


# ============================================================================== sources
def _from_data_url(url: str, where: str, limits: ImageLimits) -> tuple[bytes, str]:
    head, sep, payload = url.partition(",")
    media, *params = head[len("data:") :].split(";")
    media = media.strip().lower()
    if not sep or "base64" not in params:
        raise bad_request(f"{where}: a data URL must be base64: data:<media type>;base64,<data>", where)
    if media not in FORMATS.values():
        raise bad_request(f"{where}: image type {media or '(none)'!r} is not supported; expected one of "
                          f"{', '.join(FORMATS.values())}", where, hint="convert the image to PNG or JPEG")  # fmt: skip
    payload = "".join(payload.split())  # base64 may be wrapped
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _too_big(where, len(payload) * 3 // 4, limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where}: malformed base64 image data ({exc})", where,
                          hint="encode the file with standard base64 (A-Z, a-z, 0-9, +, /, = padding)") from None  # fmt: skip
    return data, media


def _from_remote(url: str, where: str, limits: ImageLimits) -> bytes:
    if not limits.allow_remote:
        raise bad_request(f"{where}: remote image URLs are refused by this server ({url[:60]!r})", where,
                          hint="send the image as a data:image/...;base64 URL, or start the server with "
                               "--allow-remote-images")  # fmt: skip
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.fetch_timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise bad_request(f"{where}: fetching {url[:60]!r} answered HTTP {response.status_code}", where)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise _too_big(where, int(declared), limits)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limits.max_bytes:
                    raise _too_big(where, len(data), limits)
    except httpx.HTTPError as exc:
        raise bad_request(f"{where}: cannot fetch {url[:60]!r}: {exc}", where) from None
    return bytes(data)


def _from_file(url: str, where: str, limits: ImageLimits) -> bytes:
    if limits.root is None:
        raise bad_request(f"{where}: file:// image URLs are refused by this server", where,
                          hint="send a data: URL, or start the server with --image-root DIR")  # fmt: skip
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"{where}: file URL {url[:60]!r} names a host; expected file:///path", where)
    root = limits.root.resolve()
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"{where}: {str(path)!r} is outside the image root {str(root)!r}", where,
                          hint="only files under --image-root can be sent as file:// URLs")  # fmt: skip
    try:
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise _too_big(where, size, limits)
        return path.read_bytes()
    except (OSError, ValueError) as exc:
        raise bad_request(f"{where}: cannot read {str(path)!r}: {exc.__class__.__name__}", where) from None


# ============================================================================== decoding
def _decode(data: bytes, declared: str | None, where: str, limits: ImageLimits) -> Image.Image:
    """Check format and size from the header, then decode; PIL's own bomb check is an error too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise bad_request(
                    f"{where}: the image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{limits.max_pixels} (--max-image-pixels)", where, hint="send a smaller image")  # fmt: skip
            if declared is not None and FORMATS[image.format] != declared:
                raise bad_request(f"{where}: the data URL says {declared} but the bytes are {image.format}", where,
                                  hint=f"use data:{FORMATS[image.format]};base64,...")  # fmt: skip
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bad_request(f"{where}: refused as a decompression bomb: {exc}", where) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated data...
        raise bad_request(f"{where}: cannot decode the image ({exc.__class__.__name__}: {str(exc)[:100]})", where,
                          hint=f"send a valid {', '.join(FORMATS)} file") from None  # fmt: skip
    return image


def _too_big(where: str, size: int, limits: ImageLimits) -> RequestError:
    return bad_request(f"{where}: the image is {size} bytes, over the limit of {limits.max_bytes} bytes "
                       "(--max-image-bytes)", where, hint="send a smaller or more compressed image")  # fmt: skip
