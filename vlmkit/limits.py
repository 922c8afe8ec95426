"""Every bound vlmkit puts on what it reads, in one place, and the safe readers that apply them.

Each bound has a default and an environment variable ``VLMKIT_MAX_<NAME>`` that overrides it
(a positive number; see docs/limits.md). The readers refuse what is not a regular file (a FIFO
or a character device would be read forever), paths longer than the path bound, files larger
than their kind's bound and JSON nested deeper than the depth bound, each with a vlmkit error
naming the file, the value and the variable that raises the bound.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceNotFoundError, SpecError, VlmkitError

__all__ = [
    "Limit",
    "LIMITS",
    "limit",
    "check_path",
    "read_bytes",
    "read_text",
    "read_json_file",
    "loads_json",
    "check_json_depth",
    "available_memory",
    "read_image_file",
    "raise_hint",
    "MiB",
]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limit:
    """One bound: its ``name`` (the variable is ``VLMKIT_MAX_<NAME>``), default, unit and purpose."""

    name: str
    default: float
    unit: str
    what: str

    @property
    def env(self) -> str:
        return f"VLMKIT_MAX_{self.name.upper()}"


#: Every bound, by name. docs/limits.md lists them (a test keeps the page and this table equal).
LIMITS: dict[str, Limit] = {
    lim.name: lim
    for lim in (
        Limit("yaml_bytes", 4 * MiB, "bytes", "size of a model YAML, run-folder vlmkit.yaml or recipe file"),
        Limit("json_bytes", 64 * MiB, "bytes", "size of a JSON side file (config.json, preprocessor_config.json, ...)"),
        Limit("template_bytes", 1 * MiB, "bytes", "size of a chat template file (chat_template.jinja)"),
        Limit("image_bytes", 100 * MiB, "bytes", "size of an image file read by the CLI"),
        Limit("image_pixels", 8192 * 8192, "pixels", "decoded pixels of one image (width x height)"),
        Limit("json_depth", 64, "levels", "nesting depth of a JSON side file"),
        Limit("yaml_nodes", 100_000, "nodes", "nodes of a YAML document once its aliases are expanded"),
        Limit("yaml_depth", 64, "levels", "nesting depth of a YAML document"),
        Limit("template_output", 1 * MiB, "characters", "text one chat-template rendering may produce"),
        Limit("template_seconds", 5, "seconds", "time one chat-template rendering may take"),
        Limit("template_steps", 1_000_000, "steps", "loop iterations and calls in one chat-template rendering"),
        Limit("path_chars", 4096, "characters", "length of a file or folder path"),
    )
}


def limit(name: str) -> float:
    """The bound ``name``: ``VLMKIT_MAX_<NAME>`` when set (a positive number), else its default."""
    lim = LIMITS[name]
    raw = os.environ.get(lim.env)
    if raw is None or not raw.strip():
        return lim.default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise VlmkitError(
            f"{lim.env}={raw!r} is not a positive number ({lim.what}, in {lim.unit})",
            hint=f"set {lim.env} to a positive number, or unset it for the default {lim.default:g}",
        )
    return int(value) if value == int(value) else value


def _too_big(what: str, value: float, name: str) -> str:
    lim = LIMITS[name]
    return f"{what} is {value:,.0f} {lim.unit}, over the bound of {limit(name):,.0f} {lim.unit} ({lim.what})"


def raise_hint(name: str) -> str:
    """The "how to raise it" line for bound ``name``."""
    lim = LIMITS[name]
    return f"if the input is trusted, raise the bound: {lim.env}=<{lim.unit}> (see docs/limits.md)"


def check_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path`; a :class:`SourceNotFoundError` when it is longer than the path
    bound or has a component longer than the file system allows (255 bytes)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if len(text) > limit("path_chars"):
        raise SourceNotFoundError(
            f"the path {text[:60]!r}... is {len(text):,} characters long, over the bound of "
            f"{limit('path_chars'):,.0f} ({LIMITS['path_chars'].what})",
            hint="pass a shorter path (a symlink or a relative path); " + raise_hint("path_chars"),
        )
    for part in Path(text).parts:
        if len(os.fsencode(part)) > 255:
            raise SourceNotFoundError(
                f"the path {text[:60]!r}... has a name of {len(os.fsencode(part)):,} bytes; file systems allow 255",
                hint="check the path: one of its names is far too long",
            )
    return Path(text)


def _open_regular(path: Path, kind: str) -> int:
    """An fd of ``path`` opened for reading, after checking it is a regular file (not a FIFO or a
    device, which would block or never end)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SourceNotFoundError(f"no {kind} file {str(path)!r}", hint="check the path") from None
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read {str(path)!r}: {exc.strerror or exc}", hint="check the path and permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise SourceNotFoundError(f"{str(path)!r} is a folder, not a {kind} file", hint=f"pass the path of a {kind} file")
    if not stat.S_ISREG(info.st_mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise SourceNotFoundError(
            f"{str(path)!r} is {what}, not a regular {kind} file; vlmkit reads only regular files",
            hint=f"pass the path of a regular {kind} file (copy the data into one first)",
        )
    try:  # O_NONBLOCK: were it swapped for a FIFO since the stat, opening must not wait for a writer
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read {str(path)!r}: {exc.strerror or exc}", hint="check the path and permissions") from None


def read_bytes(path: str | os.PathLike, *, kind: str, bound: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit(bound)`` of them (else an error
    naming the file); ``kind`` (``"model YAML"``) names the file in messages."""
    path = check_path(path)
    fd = _open_regular(path, kind)
    cap = int(limit(bound))
    try:
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SourceNotFoundError(f"{str(path)!r} is not a regular {kind} file", hint=f"pass a regular {kind} file")
            data = f.read(cap + 1)
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read {str(path)!r}: {exc.strerror or exc}", hint="check the path and permissions") from None
    if len(data) > cap:
        raise SpecError(
            _too_big(f"this {kind} file", max(info.st_size, len(data)), bound),
            source=str(path), hint=f"check that this is the right file; {raise_hint(bound)}",
        )
    return data


def read_text(path: str | os.PathLike, *, kind: str, bound: str) -> str:
    """:func:`read_bytes` decoded as UTF-8; a :class:`SpecError` naming the file when it is not text."""
    data = read_bytes(path, kind=kind, bound=bound)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc})", source=os.fspath(path), hint=f"a {kind} file is UTF-8 text") from None


def loads_json(text: str | bytes, *, source: str) -> Any:
    """``json.loads`` with the depth bound; a :class:`SpecError` naming ``source`` for bad JSON,
    NaN/Infinity literals included (they are not JSON)."""

    def _no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise SpecError(
            f"JSON nested deeper than Python can parse (bound: {limit('json_depth'):,.0f} levels)",
            source=source, hint="restore the file from the checkpoint; " + raise_hint("json_depth"),
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"not valid JSON ({exc})", source=source, hint="restore the file from the checkpoint") from None
    check_json_depth(data, source=source)
    return data


def check_json_depth(data: Any, *, source: str, bound: str = "json_depth") -> None:
    """Refuse ``data`` (parsed JSON/YAML) nested deeper than ``limit(bound)`` (iterative: no recursion)."""
    cap = limit(bound)
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > cap:
            raise SpecError(
                f"nested more than {cap:,.0f} levels deep ({LIMITS[bound].what})",
                source=source, hint="restore the file from the checkpoint; " + raise_hint(bound),
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def read_json_file(path: str | os.PathLike, *, kind: str = "JSON") -> Any:
    """A JSON file read with every bound: regular file, size, path length and depth."""
    data = read_bytes(path, kind=kind, bound="json_bytes")
    return loads_json(data, source=os.fspath(path))


# ----------------------------------------------------------------------------- memory


def available_memory() -> tuple[int, str] | None:
    """``(bytes, where)``: the memory this process can still take, the least of MemAvailable,
    the cgroup (v2 or v1) limit minus its usage, and ``ulimit -v`` (RLIMIT_AS) minus the current
    address space; ``None`` when none is known."""
    found = [x for x in (_mem_available(), _cgroup_room(), _rlimit_room()) if x is not None]
    return min(found) if found else None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _mem_available() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free memory"
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_room() -> tuple[int, str] | None:
    cap = _read_int("/sys/fs/cgroup/memory.max")  # v2 ("max" reads as None)
    if cap is not None:
        used = _read_int("/sys/fs/cgroup/memory.current") or 0
        return max(cap - used, 0), "room under the cgroup memory limit (memory.max)"
    cap = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v1
    if cap is not None and cap < 2**60:
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0
        return max(cap - used, 0), "room under the cgroup memory limit (memory.limit_in_bytes)"
    return None


def _rlimit_room() -> tuple[int, str] | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    used = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - used, 0), "room under the address-space limit (ulimit -v)"


# ----------------------------------------------------------------------------- images


def read_image_file(path: str | os.PathLike):
    """A fully decoded PIL image from the regular file ``path``, within the byte and pixel bounds.

    The size is checked from the header before any pixel is decoded (a decompression bomb never
    expands); a truncated or corrupt file is a :class:`~vlmkit.errors.ProcessorError` naming it.
    """
    import io
    import warnings

    from PIL import Image

    from .errors import ProcessorError

    try:
        data = read_bytes(path, kind="image", bound="image_bytes")
    except SpecError as exc:
        raise ProcessorError(f"cannot read image {os.fspath(path)!r}: {exc.detail}", hint=exc.hint) from None
    except SourceNotFoundError as exc:
        raise ProcessorError(f"cannot read image {os.fspath(path)!r}: {exc.message}", hint=exc.hint) from None
    where = f"image {os.fspath(path)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound decides below
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if pixels > limit("image_pixels"):
                raise ProcessorError(
                    f"{where} is {img.width}x{img.height} = {pixels:,} pixels, over the bound of "
                    f"{limit('image_pixels'):,.0f} pixels per image (a decompression bomb, or a huge scan)",
                    hint="downscale the image first; " + raise_hint("image_pixels"),
                )
            img.load()
            return img
    except ProcessorError:
        raise
    except Image.DecompressionBombError as exc:
        raise ProcessorError(f"{where} is a decompression bomb ({exc})", hint=raise_hint("image_pixels")) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ProcessorError(f"cannot read {where}: {type(exc).__name__}: {exc}",
                             hint="the file is truncated, corrupt or not an image; pass a PNG/JPEG/... file") from None  # fmt: skip
