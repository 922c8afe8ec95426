"""Cross-file checks made when a processor is loaded.

A checkpoint spreads one fact over several files: the image token id is in ``config.json`` and
in the tokenizer, the number of image tokens per tile in ``processor_config.json`` and (as
image size, patch size and pixel-shuffle factor) in ``config.json``, the special ids in
``config.json``, ``generation_config.json`` and ``tokenizer_config.json``. A contradiction that
would feed the model wrong inputs is a :class:`SpecError` naming both files. One that the
published checkpoints themselves contain (SmolVLM's files disagree on bos and eos) is resolved
with a :class:`SpecWarning` that says which value wins and why, at most once per kind per load.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .image import ImageSettings
from .text import (
    TILE_TOKEN_FORMAT,
    ImageTokenLayout,
    SpecWarning,
    TextTokenizer,
    count_tile_tokens,
    layout_token_names,
)

__all__ = ["CheckedSpec", "check_checkpoint"]

#: Pixel-shuffle factor the Idefics3 / SmolVLM configs default to when ``scale_factor`` is absent.
DEFAULT_SCALE_FACTOR = 2


@dataclass(frozen=True)
class CheckedSpec:
    """The token facts of a checkpoint after the cross-file checks."""

    image_seq_len: int
    image_token_id: int
    layout: ImageTokenLayout
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    end_of_utterance_id: int | None


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


def _derived_seq_len(files: _Files) -> int | None:
    """``(image_size / patch_size)^2 / scale_factor^2`` from config.json, or None when not given."""
    vision = files.config.get("vision_config")
    if not isinstance(vision, Mapping) or "image_size" not in vision or "patch_size" not in vision:
        return None
    size, patch = vision["image_size"], vision["patch_size"]
    scale = files.config.get("scale_factor", DEFAULT_SCALE_FACTOR)
    source = files.name("config.json")
    if not all(isinstance(v, int) and v > 0 for v in (size, patch, scale)) or size < patch:
        raise SpecError(
            f"image_size={size!r}, patch_size={patch!r}, scale_factor={scale!r} must be positive integers "
            "with image_size at least patch_size (the grid is image_size // patch_size)",
            key_path="vision_config",
            source=source,
        )
    side = size // patch
    if side % scale:
        raise SpecError(
            f"the {side}x{side} patch grid (image_size {size} / patch_size {patch}) cannot be pixel-shuffled "
            f"by scale_factor {scale}",
            key_path="scale_factor",
            source=source,
        )
    return (side // scale) ** 2


def _image_seq_len(files: _Files, override: int | None) -> int:
    derived = _derived_seq_len(files)
    declared = files.processor.get("image_seq_len")
    proc, conf = files.name("processor_config.json"), files.name("config.json")
    if declared is not None and (not isinstance(declared, int) or declared <= 0):
        raise SpecError(f"expected a positive integer, got {declared!r}", key_path="image_seq_len", source=proc)
    if declared is not None and derived is not None and declared != derived:
        raise SpecError(
            f"image_seq_len={declared} in {proc} but {conf} gives (image_size/patch_size)^2/scale_factor^2 = "
            f"{derived} image tokens per tile; the model would get the wrong number of image tokens",
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


def _layout(tokenizer: TextTokenizer, settings: ImageSettings, names: Mapping[str, str], rows: int) -> ImageTokenLayout:
    max_rows, max_cols = count_tile_tokens(tokenizer, TILE_TOKEN_FORMAT)
    needed = [names["fake_image_token"], names["global_image_token"]]
    if settings.do_image_splitting or max_rows:
        needed.append(TILE_TOKEN_FORMAT.format(row=1, col=1))
    missing = [t for t in needed if not tokenizer.is_added(t)]
    if missing:
        raise SpecError(
            f"the tokenizer lacks the image framing token(s) {', '.join(missing)} the Idefics3 layout needs"
            + (" (do_image_splitting is on in preprocessor_config.json)" if settings.do_image_splitting else ""),
            source=tokenizer.source,
            hint="use the tokenizer files that came with the checkpoint",
        )
    beyond = [t for t in needed if tokenizer.token_to_id(t) >= rows]
    if beyond:
        raise SpecError(
            f"framing token(s) {', '.join(beyond)} have ids beyond the {rows}-row embedding", source=tokenizer.source
        )
    not_special = [t for t in needed + [names["image_token"]] if not tokenizer.is_special(t)]
    if not_special:
        warnings.warn(
            f"{tokenizer.source}: image token(s) {', '.join(not_special)} are not marked special; they are still "
            "matched whole, but decode(skip_special_tokens=True) will keep them",
            SpecWarning,
            stacklevel=4,
        )
    return ImageTokenLayout(
        image=names["image_token"],
        fake=names["fake_image_token"],
        global_image=names["global_image_token"],
        tile_format=TILE_TOKEN_FORMAT,
        max_rows=max_rows,
        max_cols=max_cols,
    )


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


def _warn_disagreement(kind: str, tokenizer: TextTokenizer, found, chosen, why: str) -> None:
    if len({frozenset(ids) for _, ids in found}) > 1:
        warnings.warn(
            f"checkpoint files disagree on the {kind} token: {_describe(tokenizer, found)}. "
            f"vlmkit uses {list(chosen) if isinstance(chosen, tuple) else chosen} because {why}",
            SpecWarning,
            stacklevel=5,
        )


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


def _eos(files: _Files, tokenizer: TextTokenizer, eou: int | None, rows: int) -> tuple[int, ...]:
    found = _sources(files, tokenizer, "eos")
    gen = _ids(files.generation.get("eos_token_id"))
    if gen is not None:
        base, why = gen, "generation_config.json is the file written for generation"
        _check_in_vocab("eos", files, gen, rows, files.name("generation_config.json"))
    else:
        base = next((ids for where, ids in reversed(found)), ())
        why = f"{found[-1][0]} is the most specific source" if found else "no file states one"
    chosen = tuple(dict.fromkeys(base + ((eou,) if eou is not None else ())))
    if eou is not None:
        why += f", plus the end-of-utterance token {tokenizer.id_to_token(eou)!r} that closes every chat turn"
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


def check_checkpoint(
    folder: Path,
    *,
    config: Mapping[str, Any] | None,
    processor_config: Mapping[str, Any] | None,
    generation_config: Mapping[str, Any] | None,
    tokenizer: TextTokenizer,
    settings: ImageSettings,
    image_seq_len: int | None = None,
) -> CheckedSpec:
    """Check the checkpoint files against each other; see the module docstring."""
    files = _Files(Path(folder), config or {}, processor_config or {}, generation_config or {})
    rows, _ = _embedding_rows(files, tokenizer)
    seq_len = _image_seq_len(files, image_seq_len)
    _check_tile(files, settings)
    names = layout_token_names(tokenizer.config)
    image_id = _image_token_id(files, tokenizer, names["image_token"], rows)
    layout = _layout(tokenizer, settings, names, rows)
    eou = tokenizer.token_to_id(names["end_of_utterance_token"])
    return CheckedSpec(
        image_seq_len=seq_len,
        image_token_id=image_id,
        layout=layout,
        pad_token_id=_pad(files, tokenizer, rows),
        bos_token_id=_bos(files, tokenizer),
        eos_token_ids=_eos(files, tokenizer, eou, rows),
        end_of_utterance_id=eou,
    )
