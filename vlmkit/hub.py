"""Finding a checkpoint: a local folder, or a Hugging Face Hub repo id fetched with huggingface_hub.

Downloads go through ``huggingface_hub.snapshot_download`` so they share the user's HF cache and
honour ``HF_HUB_OFFLINE``. A repo id already in the cache resolves without network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import SourceNotFoundError, SpecError

__all__ = ["resolve_source", "read_json", "CHECKPOINT_PATTERNS"]

#: Files vlmkit reads from a checkpoint. Pickle files (``*.bin``, ``*.pt``) are never fetched.
#: (Keep every pattern specific: a pattern like ``*`` or ``*.bin`` would fetch pickles.)
CHECKPOINT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "merges.txt",
]


def resolve_source(source: str | os.PathLike, *, weights: bool = True, revision: str | None = None) -> Path:
    """Return a local folder holding ``source``'s files.

    ``source`` is a folder path, or a Hub repo id (``owner/name``). With ``weights=False`` only
    the small JSON/tokenizer files are fetched.
    """
    text = _source_text(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceNotFoundError(
            f"{text!r} is a file, not a checkpoint folder",
            hint="pass the folder that holds config.json (and the .safetensors weights)",
        )
    if not _looks_like_repo_id(text):
        raise SourceNotFoundError(
            f"no folder {text!r}, and it is not a Hub repo id (owner/name)",
            hint="check the path, or pass a Hub repo id (owner/name)",
        )
    return _snapshot(text, weights=weights, revision=revision)


def _source_text(source: object) -> str:
    """``source`` as a non-empty path string; a clear error for ``None``, numbers, ``""``..."""
    if not isinstance(source, (str, os.PathLike)):
        raise SourceNotFoundError(
            f"expected a checkpoint folder path or a Hub repo id (owner/name), got {type(source).__name__} {source!r}",
            hint="pass a path such as ./my-checkpoint or a Hub repo id (owner/name)",
        )
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise SourceNotFoundError(
            "the checkpoint source is an empty string",
            hint="pass a checkpoint folder path or a Hub repo id (owner/name)",
        )
    from .limits import check_path

    check_path(text)
    return text


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))


def _snapshot(repo_id: str, *, weights: bool, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = CHECKPOINT_PATTERNS if weights else [p for p in CHECKPOINT_PATTERNS if p != "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise SourceNotFoundError(
            f"no local folder {repo_id!r}, and Hub repo {repo_id!r} is not in the local Hugging Face cache "
            f"while the Hub cannot be reached (offline or no network; HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}): {exc.__class__.__name__}",
            hint="download it once with network (`hf download REPO`), or pass a local folder",
        ) from exc
    except HFValidationError as exc:
        raise SourceNotFoundError(
            f"no folder {repo_id!r}, and it is not a valid Hub repo id ({exc})",
            hint="check the path, or pass a Hub repo id (owner/name)",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFoundError(
            f"Hub repo {repo_id!r} does not exist (or is private)",
            hint="check the spelling, or log in with `hf auth login` for a private repo",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise SourceNotFoundError(
            f"could not fetch Hub repo {repo_id!r}: {exc}",
            hint="check the network, or pass a local folder",
        ) from exc


def read_json(folder: Path, name: str, *, required: bool = True) -> dict[str, Any] | None:
    """Read ``folder/name`` as a JSON object; ``None`` when optional and absent.

    Raises :class:`SpecError` naming the file when it is not JSON or not an object.
    """
    from .limits import check_path

    path = check_path(Path(folder) / name)
    if path.exists() and not path.is_file():
        raise SourceNotFoundError(f"{path} is not a file", hint=f"{name} must be a JSON file; restore it from the checkpoint")
    if not path.is_file():
        if required:
            raise SourceNotFoundError(
                f"{path} does not exist",
                hint=f"a checkpoint folder needs {name}; pass the folder that holds it",
            )
        return None
    from .limits import read_json_file

    data = read_json_file(path, kind=name)
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a JSON object at the top level, got {type(data).__name__}",
            source=str(path), hint=f"{name} must be a JSON object ({{...}}); restore the file from the checkpoint",
        )
    return data
