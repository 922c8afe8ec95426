"""Cross-file checks made when a processor is loaded.

A checkpoint spreads one fact over several files: the image token id is in ``config.json`` and
in the tokenizer, the number of image tokens per tile in ``processor_config.json`` and (as
image size, patch size and pixel-shuffle factor) in ``config.json``, the special ids in
``config.json``, ``generation_config.json`` and ``tokenizer_config.json``. A contradiction that
would feed the model wrong inputs is a :class:`SpecError` naming both files. One that the
published checkpoints themselves contain (some published files disagree on bos and eos) is resolved
and logged once per process at INFO (logger ``vlmkit.processor.checks``; ``vlmkit --verbose``
shows it), saying which value wins and why: the user can do nothing about it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..family import Family, PromptLayout
from .image import ImageSettings
from .text import SpecWarning, TextTokenizer

__all__ = ["CheckedSpec", "SpecialIds", "check_checkpoint", "special_ids"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedSpec:
    """The token facts of a checkpoint after the cross-file checks."""

    image_seq_len: int
    image_token_id: int
    layout: PromptLayout
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass
class _Files:
    folder: Path
    config: Mapping[str, Any]
    processor: Mapping[str, Any]
    generation: Mapping[str, Any]

    def name(self, file: str) -> str:
        return str(self.folder / file)


def _text_value(config: Mapping[str, Any], key: str) -> tuple[Any, str]:
    """``config.text_config[key]`` when set, else ``config[key]``; with its key path."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and text.get(key) is not None:
        return text[key], f"text_config.{key}"
    return config.get(key), key


def _embedding_rows(files: _Files, tokenizer: TextTokenizer) -> tuple[int, str]:
    """How many token ids the language model has embeddings for, and where that number is from."""
    value, key = _text_value(files.config, "vocab_size")
    if isinstance(value, int) and value > 0:
        return value, f"{files.name('config.json')} {key}"
    return tokenizer.vocab_size, tokenizer.source


# ----------------------------------------------------------------------------- image tokens


def _derived_seq_len(files: _Files, family: Family | None) -> int | None:
    """Image tokens per tile as the checkpoint's family reads config.json (no processor_config.json
    cross-check here: :func:`_image_seq_len` makes it), or ``None`` without a config.json."""
    if family is None or files.config.get("model_type") not in family.model_types:
        return None  # no checkpoint config.json of this family (e.g. a spec's vision side instead)
    data = family.spec_from_config(dict(files.config), None, files.name("config.json"))
    packer = data.get("packer") if isinstance(data, Mapping) else None
    value = packer.get("tokens_per_image") if isinstance(packer, Mapping) else None
    return value if isinstance(value, int) else None


def _image_seq_len(files: _Files, family: Family | None, override: int | None) -> int:
    derived = _derived_seq_len(files, family)
    declared = files.processor.get("image_seq_len")
    proc, conf = files.name("processor_config.json"), files.name("config.json")
    if declared is not None and (not isinstance(declared, int) or declared <= 0):
        raise SpecError(f"expected a positive integer, got {declared!r}", key_path="image_seq_len", source=proc)
    if declared is not None and derived is not None and declared != derived:
        raise SpecError(
            f"image_seq_len={declared} in {proc} but {conf} gives {derived} image tokens per tile; "
            "the model would get the wrong number of image tokens",
            key_path="image_seq_len",
            source=f"{proc} vs {conf}",
            hint="fix or delete image_seq_len in processor_config.json (config.json describes the trained model)",
        )
    if override is not None:
        if not isinstance(override, int) or override <= 0:
            raise SpecError(f"image_seq_len must be a positive integer, got {override!r}", key_path="image_seq_len")
        if derived is not None and override != derived:
            raise SpecError(
                f"image_seq_len={override} was passed but {conf} gives {derived} image tokens per tile",
                key_path="image_seq_len",
                source=conf,
                hint="drop the image_seq_len argument; config.json describes the trained model",
            )
        return override
    if declared is None and derived is None:
        raise SpecError(
            "cannot tell how many image tokens a tile costs: no image_seq_len in processor_config.json and no "
            "vision_config image_size/patch_size in config.json",
            source=str(files.folder),
            hint="pass load_processor(..., image_seq_len=N)",
        )
    return declared if declared is not None else derived


def _check_tile(files: _Files, settings: ImageSettings) -> None:
    vision = files.config.get("vision_config")
    size = vision.get("image_size") if isinstance(vision, Mapping) else None
    if isinstance(size, int) and size != settings.tile:
        raise SpecError(
            f"tiles are {settings.tile} px (max_image_size.longest_edge in preprocessor_config.json) but the "
            f"vision encoder takes {size} px images (vision_config.image_size in {files.name('config.json')})",
            key_path="max_image_size.longest_edge",
            source=f"{files.name('preprocessor_config.json')} vs {files.name('config.json')}",
            hint="make max_image_size.longest_edge equal vision_config.image_size",
        )


def _image_token_id(files: _Files, tokenizer: TextTokenizer, token: str, rows: int) -> int:
    conf = files.name("config.json")
    tok_id = tokenizer.token_to_id(token)
    if tok_id is None or not tokenizer.is_added(token):
        raise SpecError(
            f"the tokenizer has no added token {token!r} for image placeholders",
            source=tokenizer.source,
            hint="use the tokenizer files that came with the checkpoint",
        )
    value, key = _text_value(files.config, "image_token_id")
    if value is None:
        value, key = files.config.get("image_token_index"), "image_token_index"
    if value is None:
        return tok_id
    if not isinstance(value, int) or value < 0 or value >= rows:
        raise SpecError(
            f"{value!r} is not a token id inside the {rows}-token vocabulary",
            key_path=key,
            source=conf,
        )
    if value != tok_id:
        raise SpecError(
            f"{key}={value} ({tokenizer.id_to_token(value)!r}) in {conf} but the tokenizer's {token!r} is id "
            f"{tok_id}; image features would be scattered into the wrong positions",
            key_path=key,
            source=f"{conf} vs {tokenizer.source}",
            hint="use the config.json and tokenizer.json of the same checkpoint",
        )
    return tok_id


# ----------------------------------------------------------------------------- bos / eos / pad


def _ids(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _sources(files: _Files, tokenizer: TextTokenizer, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every place that states the ``kind`` ('bos'/'eos'/'pad') id, as ``(description, ids)``."""
    key = f"{kind}_token_id"
    found = []
    value, path = _text_value(files.config, key)
    if _ids(value):
        found.append((f"config.json {path}", _ids(value)))
    if kind == "pad" and path != key and _ids(files.config.get(key)) and _ids(files.config.get(key)) != _ids(value):
        found.append((f"config.json {key}", _ids(files.config[key])))
    if _ids(files.generation.get(key)):
        found.append((f"generation_config.json {key}", _ids(files.generation[key])))
    role = tokenizer.roles.get(f"{kind}_token")
    if role is not None and tokenizer.token_to_id(role) is not None:
        found.append((f"tokenizer {kind}_token {role!r}", (tokenizer.token_to_id(role),)))
    return found


def _describe(tokenizer: TextTokenizer, found: list[tuple[str, tuple[int, ...]]]) -> str:
    parts = []
    for where, ids in found:
        named = ", ".join(f"{i} ({tokenizer.id_to_token(i)!r})" for i in ids)
        parts.append(f"{where} = {named}")
    return "; ".join(parts)


#: Resolutions already logged (each is logged once per process).
_LOGGED: set[str] = set()


def _warn_disagreement(kind: str, tokenizer: TextTokenizer, found, chosen, why: str) -> None:
    """Log (once, at INFO: the user cannot act on it) which id wins when the files disagree."""
    if len({frozenset(ids) for _, ids in found}) > 1:
        message = (
            f"{Path(tokenizer.source).parent}: checkpoint files disagree on the {kind} token: "
            f"{_describe(tokenizer, found)}. vlmkit uses {list(chosen) if isinstance(chosen, tuple) else chosen} "
            f"because {why}"
        )
        if message not in _LOGGED:
            _LOGGED.add(message)
            log.info("%s", message)


def _check_in_vocab(kind: str, files: _Files, ids, rows: int, where: str) -> None:
    bad = [i for i in ids if not 0 <= i < rows]
    if bad:
        raise SpecError(
            f"{kind} token id(s) {bad} are outside the {rows}-token vocabulary",
            source=where,
            hint="generation could never stop on them; fix the id in that file",
        )


def _bos(files: _Files, tokenizer: TextTokenizer) -> int | None:
    found = _sources(files, tokenizer, "bos")
    if not found:
        return None
    chosen = tokenizer.role_id("bos_token")
    why = "the tokenizer (with the chat template) decides what the model reads first; bos is not inserted"
    if chosen is None:
        chosen, why = found[-1][1][0], f"{found[-1][0]} is the only tokenizer-independent source left"
    _warn_disagreement("bos", tokenizer, found, chosen, why)
    return chosen


def _eos(files: _Files, tokenizer: TextTokenizer, turn_ends: tuple[int, ...], rows: int) -> tuple[int, ...]:
    found = _sources(files, tokenizer, "eos")
    gen = _ids(files.generation.get("eos_token_id"))
    if gen is not None:
        base, why = gen, "generation_config.json is the file written for generation"
        _check_in_vocab("eos", files, gen, rows, files.name("generation_config.json"))
    else:
        base = next((ids for where, ids in reversed(found)), ())
        why = f"{found[-1][0]} is the most specific source" if found else "no file states one"
    stated = tuple(i for where, ids in found if where.startswith("config.json") for i in ids if 0 <= i < rows)
    chosen = tuple(dict.fromkeys(base + stated + turn_ends))
    if stated and not set(stated) <= set(base):
        why += f", plus config.json's eos id(s) {list(stated)} (the text model's own end of text)"
    if turn_ends:
        why += f", plus the turn-end token(s) {[tokenizer.id_to_token(i) for i in turn_ends]} that close every chat turn"
    _warn_disagreement("eos", tokenizer, found, chosen, why)
    return chosen


def _pad(files: _Files, tokenizer: TextTokenizer, rows: int) -> int | None:
    found = _sources(files, tokenizer, "pad")
    usable = [(w, ids) for w, ids in found if len(ids) == 1 and 0 <= ids[0] < rows]
    if not usable:
        return None
    # Priority: the tokenizer, then generation_config.json, then config.json.
    where, (chosen,) = usable[-1]
    why = (
        f"{where} is used for padding; padded positions are masked out by attention_mask, so the model never reads them"
    )
    ignored = [w for w, ids in found if (w, ids) not in usable]
    if ignored:
        why += f" ({', '.join(ignored)} is outside the {rows}-token vocabulary and ignored)"
    _warn_disagreement("pad", tokenizer, found, chosen, why)
    return chosen


@dataclass(frozen=True)
class SpecialIds:
    """The bos, eos and pad ids of a checkpoint, resolved once from all its files (see :func:`special_ids`)."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


def _special_ids(files: _Files, tokenizer: TextTokenizer, family: Family | None, rows: int) -> SpecialIds:
    """The one answer for bos/eos/pad: eos ids are generation_config.json's (else the most specific
    file's), then every other eos id config.json states, then the family's turn-end tokens."""
    turn_ends = tuple(
        i for i in (tokenizer.token_to_id(t) for t in (family.stop_tokens(tokenizer.config) if family else ())) if i is not None
    )
    return SpecialIds(_bos(files, tokenizer), _eos(files, tokenizer, turn_ends, rows), _pad(files, tokenizer, rows))


@functools.lru_cache(maxsize=16)
def special_ids(folder: str) -> SpecialIds:
    """:class:`SpecialIds` of the checkpoint files in ``folder`` (read once per folder); the
    processor and generation both use this answer."""
    from ..hf import family_of_folder
    from ..hub import read_json

    path = Path(folder)
    tokenizer = TextTokenizer.from_folder(path)
    files = _Files(path, read_json(path, "config.json", required=False) or {}, {},
                   read_json(path, "generation_config.json", required=False) or {})  # fmt: skip
    rows, _ = _embedding_rows(files, tokenizer)
    return _special_ids(files, tokenizer, family_of_folder(path), rows)


def check_checkpoint(
    folder: Path,
    *,
    family: Family,
    config: Mapping[str, Any] | None,
    processor_config: Mapping[str, Any] | None,
    generation_config: Mapping[str, Any] | None,
    tokenizer: TextTokenizer,
    settings: Any,
    image_seq_len: int | None = None,
) -> CheckedSpec:
    """Check the checkpoint files against each other; see the module docstring. ``family`` (of
    the checkpoint in ``folder``) gives the prompt layout and the turn-end tokens; ``settings``
    (the tiled :class:`ImageSettings`, or the family's own image processing) go to its
    :meth:`~vlmkit.family.Family.prompt_layout`."""
    files = _Files(Path(folder), config or {}, processor_config or {}, generation_config or {})
    rows, _ = _embedding_rows(files, tokenizer)
    seq_len = _image_seq_len(files, family, image_seq_len)
    if isinstance(settings, ImageSettings):  # a family's own image processing checks its own sizes
        _check_tile(files, settings)
    layout = family.prompt_layout(tokenizer, settings, rows)
    image_id = _image_token_id(files, tokenizer, layout.image, rows)
    ids = _special_ids(files, tokenizer, family, rows)
    return CheckedSpec(
        image_seq_len=seq_len,
        image_token_id=image_id,
        layout=layout,
        pad_token_id=ids.pad_token_id,
        bos_token_id=ids.bos_token_id,
        eos_token_ids=ids.eos_token_ids,
    )
