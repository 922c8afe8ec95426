"""An on-disk cache of quantized weights: safetensors files keyed by the source and the scheme.

The key hashes, for every ``*.safetensors`` file of the source folder: its name, size,
modification time and its safetensors header (tensor names, dtypes, shapes, offsets), plus the
scheme, the torch version and the CPU capability (packed int4 layouts are kernel-specific).
Hashing the header instead of the whole file keeps a cache hit well under a second; a rewritten
file changes its size/mtime/header and so its key. The folder is ``$VLMKIT_CACHE/quant``
(default ``~/.cache/vlmkit/quant``). Files are written to a temporary name and renamed, so a
crash never leaves a half-written entry; nothing is unpickled. A file that cannot be read or
does not fit the model is ignored with a one-line warning and rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import VlmkitError

__all__ = ["cache_dir", "cache_key", "load_cached", "save_cached", "load_choice", "save_choice"]

log = logging.getLogger(__name__)

#: a safetensors header larger than this is not a safetensors file we hash
MAX_HEADER = 100 << 20
#: a cached scheme choice (a small JSON report) larger than this is not one
MAX_CHOICE_BYTES = 64 << 10


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$VLMKIT_CACHE/quant``, else ``~/.cache/vlmkit/quant``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("VLMKIT_CACHE")
    return Path(root) / "quant" if root else Path.home() / ".cache" / "vlmkit" / "quant"


def _header(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise VlmkitError(f"{path} is not a safetensors file (shorter than 8 bytes)", hint="re-download the checkpoint")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise VlmkitError(f"{path} has a {size}-byte safetensors header (> {MAX_HEADER})", hint="re-download the checkpoint")
        return f.read(size)


def cache_key(source: str | os.PathLike, scheme: str) -> str:
    """A hex key for ``source``'s weights quantized with ``scheme`` on this torch and CPU."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    if not files or not all(f.is_file() for f in files):
        raise VlmkitError(f"no safetensors weights at {os.fspath(source)!r} to key the quantization cache on",
                          hint="pass the checkpoint folder the model was built from, or no source (no cache)")  # fmt: skip
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(hashlib.sha256(_header(f)).digest())
    h.update(f"{scheme}\0{torch.__version__}\0{torch.backends.cpu.get_cpu_capability()}".encode())
    return h.hexdigest()[:32]


def _path(key: str, scheme: str, folder: Path) -> Path:
    return folder / f"{key}-{scheme}.safetensors"


def load_cached(key: str, scheme: str, folder: Path,
                check: Callable[[dict[str, torch.Tensor]], str | None] | None = None) -> dict[str, torch.Tensor] | None:  # fmt: skip
    """The cached tensors for ``key`` (None when absent).

    A file that cannot be read (corrupt, truncated, not safetensors), that was written for another
    scheme, or whose tensors ``check`` rejects (it returns why, or None when they fit) is ignored
    with a one-line warning on the ``vlmkit`` log, and None is returned: the caller quantizes
    again and overwrites it."""
    path = _path(key, scheme, folder)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("scheme")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error types, and OSError
        return _ignore(path, f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if stored != scheme:
        return _ignore(path, f"it was written for scheme {stored!r}, not {scheme!r}")
    why = check(tensors) if check is not None else None
    return tensors if why is None else _ignore(path, why)


def _ignore(path: Path, why: str) -> None:
    log.warning("ignoring the quantization cache file %s: %s; quantizing again and rewriting it", path, why)


def save_cached(key: str, scheme: str, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` for ``key`` atomically; returns the file's path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = _path(key, scheme, folder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"scheme": scheme})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _choice_path(key: str, folder: Path) -> Path:
    return folder / f"{key}-choice.json"


def load_choice(key: str, folder: Path, cpu: dict, schemes: tuple[str, ...]) -> dict | None:
    """A scheme choice saved by :func:`save_choice` for ``key`` on a CPU with these ``cpu`` flags
    (None when absent; a file that is unreadable, too large, for other flags or another scheme
    set is ignored with a one-line warning, and the caller times the schemes again)."""
    import json

    path = _choice_path(key, folder)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_CHOICE_BYTES:
            raise ValueError(f"larger than {MAX_CHOICE_BYTES} bytes")
        choice = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return _ignore(path, f"it cannot be read ({type(exc).__name__}: {exc})")
    if not isinstance(choice, dict) or choice.get("scheme") not in schemes:
        return _ignore(path, "it names no known scheme")
    if choice.get("cpu") != cpu:
        return _ignore(path, f"it was timed on a CPU with other flags ({choice.get('cpu')!r})")
    return choice


def save_choice(key: str, folder: Path, choice: dict) -> Path:
    """Write the JSON ``choice`` report for ``key`` atomically; returns the file's path."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = _choice_path(key, folder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(choice), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
