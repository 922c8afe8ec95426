"""Run folders: a folder holding ``vlmkit.yaml`` (a model spec) next to its weights and tokenizer.

``vlmkit train`` ends with one (its ``output_dir``). The spec inside names its sources relative
to the folder (``weights: .``, ``tokenizer: .``), so the folder can be moved or copied as a
whole. :func:`vlmkit.build`, :func:`vlmkit.build_from_hf`, :func:`vlmkit.load_processor`,
``vlmkit generate`` and ``vlmkit inspect`` accept such a folder wherever they accept a
checkpoint folder; this module is the one place that knows the layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["RUN_SPEC_NAME", "is_run_folder", "load_run_spec", "resolve_relative"]

#: The spec file that marks a run folder.
RUN_SPEC_NAME = "vlmkit.yaml"


def is_run_folder(source: Any) -> bool:
    """Whether ``source`` is a local folder holding :data:`RUN_SPEC_NAME`."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        return (Path(source) / RUN_SPEC_NAME).is_file()
    except (OSError, ValueError):
        return False


def resolve_relative(value: Any, folder: Path) -> Any:
    """``weights`` / ``tokenizer`` values with relative local paths made absolute against ``folder``.

    A value is a path when it starts with ``.`` or names an existing entry of ``folder``; Hub repo
    ids (``owner/name``) are left alone.
    """
    if isinstance(value, dict):
        return {k: resolve_relative(v, folder) for k, v in value.items()}
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = folder / value
    if value.startswith(".") or candidate.exists():
        return str(candidate.resolve())
    return value


def load_run_spec(folder: str | os.PathLike):
    """The validated :class:`~vlmkit.spec.VLMSpec` of a run folder, its sources made absolute."""
    from .errors import SpecError
    from .limits import read_text
    from .spec import validate_spec
    from .yaml_safe import load

    folder = Path(folder)
    path = folder / RUN_SPEC_NAME
    data = load(read_text(path, kind="run-folder spec", bound="yaml_bytes"), source=str(path))
    if not isinstance(data, dict):
        raise SpecError("a run folder's spec is a mapping of the model slots", source=str(path),
                        hint="restore the file from the run (vlmkit train writes it)")  # fmt: skip
    data = dict(data)
    for key in ("weights", "tokenizer"):
        if key in data:
            data[key] = resolve_relative(data[key], folder.resolve())
    return validate_spec(data, source=str(path))
