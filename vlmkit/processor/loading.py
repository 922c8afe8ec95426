"""Loading a :class:`~vlmkit.processor.Processor`: where the files come from and what they say.

:func:`load_processor` resolves the checkpoint folder (or a model YAML's ``tokenizer:``), reads
the image settings and the config files, lets a spec's components override the vision side,
and checks the files against each other before the processor is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ProcessorError
from ..family import Family
from ..hf import family_of_folder, resolve_config_folder
from ..hub import read_json, resolve_source
from .checks import check_checkpoint
from .image import ImageSettings
from .text import TextTokenizer, load_chat_template

if TYPE_CHECKING:
    from .processor import Processor

__all__ = ["load_processor"]


def load_processor(
    source: str | os.PathLike | None = None,
    *,
    spec: Any = None,
    image_seq_len: int | None = None,
    max_visual_tokens: int | None = None,
    revision: str | None = None,
) -> Processor:
    """Build a :class:`Processor` from a checkpoint folder or Hub repo id (only small files are fetched).

    Reads preprocessor_config.json, processor_config.json, config.json, generation_config.json,
    the tokenizer files and the chat template, and checks them against each other
    (:class:`~vlmkit.errors.SpecError` on contradictions that would break the model,
    :class:`~vlmkit.processor.SpecWarning` on ones vlmkit resolves).

    ``spec`` (a :class:`~vlmkit.spec.VLMSpec` or a model YAML path; a YAML path may also be
    passed as ``source``) drives the image side for an assembled model whose tower differs from
    the checkpoint the tokenizer comes from: tile size, visual tokens per image, the placeholder
    id and (when the tower declares them) mean/std come from the spec's declared facts
    (:mod:`vlmkit.facts`: the components' params, no model built), and the
    longest edge keeps the checkpoint's largest tile grid; the tokenizer, chat template and the
    other resize settings come from ``source`` (default ``spec.tokenizer``).
    """
    from .processor import Processor  # processor.py re-exports load_processor: import the class at call time

    spec, source = _spec_and_source(spec, source)
    folder = _checkpoint_folder(source, revision)
    family = _family(folder)  # before reading image settings: the family may have no processor yet
    side = _family_image_processing(family, folder, spec)  # None: the core's tiled image processor
    if side is None:
        settings, config, processor_config, image_seq_len = _vision_side(folder, spec, image_seq_len)
    else:
        settings, config = side.settings, read_json(folder, "config.json", required=False)
        processor_config = None  # read by the family's image processing (its tokens per image: image_seq_len)
        image_seq_len = _family_seq_len(side, image_seq_len)
    tokenizer = TextTokenizer.from_folder(folder)
    # check_checkpoint and load_chat_template are called from here: their SpecWarnings' stacklevels name our caller
    checked = check_checkpoint(
        folder,
        family=family,
        config=config,
        processor_config=processor_config,
        generation_config=read_json(folder, "generation_config.json", required=False),
        tokenizer=tokenizer,
        settings=settings if side is None else side,
        image_seq_len=image_seq_len,
    )
    _check_placeholder(spec, side, checked.image_token_id)
    template = load_chat_template(folder, tokenizer.config)
    video = family.video_layout(tokenizer, checked.layout, *_preprocessor(folder, side is None))  # None: no video
    return Processor(tokenizer, settings, checked, chat_template=template, max_visual_tokens=max_visual_tokens,
                     video_layout=video, image_processing=side)  # fmt: skip


def _preprocessor(folder: Path, required: bool = True) -> tuple[dict[str, Any], str]:
    """preprocessor_config.json of ``folder`` (``{}`` when optional and absent) and its path (for
    the family's video settings)."""
    return read_json(folder, "preprocessor_config.json", required=required) or {}, str(folder / "preprocessor_config.json")


def _family_image_processing(family: Family, folder: Path, spec: Any) -> Any:
    """The family's own image processing of the checkpoint in ``folder`` (``None``: the tiled default).

    Its files, not a spec, decide it: with ``spec`` the spec's declared facts must agree with it
    (the tower's input size and the visual tokens per image), else :class:`ProcessorError`."""
    side = family.image_processing(
        folder,
        read_json(folder, "preprocessor_config.json", required=False),
        read_json(folder, "processor_config.json", required=False),
        read_json(folder, "config.json", required=False),
    )
    if side is not None and spec is not None:
        from ..facts import spec_facts

        facts = spec_facts(spec)
        ours = ((facts.geometry.image_size,) * 2, facts.tokens_per_image)
        if ours != (tuple(side.input_size), side.image_seq_len):
            raise ProcessorError(
                f"spec= cannot drive the image side of a {family.name!r} checkpoint's processor (its family has its "
                f"own image processing, read from the files in {str(folder)!r}), and the two disagree: the spec's tower "
                f"takes {ours[0][0]}x{ours[0][1]} px images of {ours[1]} visual tokens, the files make "
                f"{side.input_size[0]}x{side.input_size[1]} px images of {side.image_seq_len}",
                hint="load the processor from the checkpoint folder alone (drop spec=), or use a tokenizer "
                "checkpoint whose image processor fits the spec's tower",
            )
    return side


def _check_placeholder(spec: Any, side: Any, image_token_id: int) -> None:
    """With a family's own image side, the spec's packer must look for the files' placeholder id."""
    if spec is not None and side is not None and spec.packer.params.image_token_id != image_token_id:
        raise ProcessorError(
            f"the spec's packer.image_token_id is {spec.packer.params.image_token_id} but the checkpoint's files "
            f"write {image_token_id} for each image token",
            hint=f"set packer.image_token_id to {image_token_id}",
        )


def _family_seq_len(side: Any, image_seq_len: int | None) -> int:
    """The family's tokens per image; an ``image_seq_len`` argument must agree with it."""
    if image_seq_len is not None and image_seq_len != side.image_seq_len:
        raise ProcessorError(
            f"image_seq_len={image_seq_len} was passed but the checkpoint's image processing gives "
            f"{side.image_seq_len} image tokens per image",
            hint="drop the image_seq_len argument; the checkpoint files decide it",
        )
    return side.image_seq_len


def _family(folder: Path) -> Family:
    """The family of the checkpoint whose tokenizer the processor uses (it decides the prompt layout)."""
    family = family_of_folder(folder)
    if family is None:
        from ..plugins import get_registry

        config = read_json(folder, "config.json", required=False) or {}
        raise ProcessorError(
            f"no installed model family knows the checkpoint in {str(folder)!r} (model_type "
            f"{config.get('model_type')!r}), so its prompt layout of images is unknown",
            hint=f"installed families read: {', '.join(get_registry().model_types())}; the tokenizer folder needs "
            "the config.json of its checkpoint",
        )
    if not family.has_processor:
        raise ProcessorError(
            f"the {family.name!r} model family has no vlmkit processor yet (checkpoint {str(folder)!r})",
            hint="build the inputs with the family's transformers processor, or use a checkpoint of a family "
            "with one: " + ", ".join(sorted({f.name for f in _registry().families() if f.has_processor})),
        )
    return family


def _registry():
    from ..plugins import get_registry

    return get_registry()


def _spec_and_source(spec: Any, source: str | os.PathLike | None) -> tuple[Any, str | os.PathLike]:
    from ..run_folder import is_run_folder, load_run_spec
    from ..spec import load_yaml

    if spec is None and is_run_folder(source):  # an output_dir of `vlmkit train`: its spec drives the vision side
        spec = load_run_spec(source)
        source = None
    if spec is None and source is not None and os.fspath(source).endswith((".yaml", ".yml")):
        spec = source
        source = None
    if isinstance(spec, (str, os.PathLike)):
        spec = load_yaml(spec)
    if source is None:
        source = getattr(spec, "tokenizer", None)
        if source is None:
            raise ProcessorError(
                "no tokenizer source: pass a checkpoint folder or repo id, or a spec with `tokenizer:`",
                hint="add `tokenizer: <folder or repo id>` to the model YAML",
            )
    return spec, source


def _checkpoint_folder(source: str | os.PathLike, revision: str | None) -> Path:
    """The local folder with ``source``'s small files (no weights)."""
    if revision is None:  # a bundled repo id falls back to vlmkit's copy of its files when offline
        folder, _ = resolve_config_folder(source)
    else:
        folder = resolve_source(source, weights=False, revision=revision)
    return folder


def _vision_side(
    folder: Path, spec: Any, image_seq_len: int | None
) -> tuple[ImageSettings, dict[str, Any] | None, dict[str, Any] | None, int | None]:
    """Image settings, config.json, processor_config.json and tokens per image: the checkpoint's,
    or, with ``spec``, those of the spec's components (processor_config.json is then dropped)."""
    settings = ImageSettings.from_config(
        read_json(folder, "preprocessor_config.json"), source=str(folder / "preprocessor_config.json")
    )
    config = read_json(folder, "config.json", required=False)
    processor_config = read_json(folder, "processor_config.json", required=False)
    if spec is not None:
        settings, config, image_seq_len = _from_spec(spec, settings)
        processor_config = None  # the spec, not the tokenizer checkpoint, describes the vision side
    return settings, config, processor_config, image_seq_len


def _from_spec(spec: Any, settings: ImageSettings) -> tuple[ImageSettings, dict[str, Any], int]:
    """Image settings, a config-like dict and tokens per image from the spec's declared facts
    (:func:`vlmkit.facts.spec_facts`: the components' params; no model is assembled)."""
    import dataclasses

    from ..facts import spec_facts

    facts = spec_facts(spec)
    tile = facts.geometry.image_size
    # Keep the checkpoint's largest tile grid (e.g. 2048 / 512 = 4 x 4 tiles) at the new tile size.
    grid = max(1, settings.longest_edge // settings.tile)
    updates: dict[str, Any] = {"tile": tile, "longest_edge": grid * tile}
    for field, value in (("mean", facts.geometry.image_mean), ("std", facts.geometry.image_std)):
        if value is not None:
            updates[field] = tuple(float(v) for v in value)
    config: dict[str, Any] = {"image_token_id": facts.image_token_id}
    if facts.vocab_size is not None:  # else the tokenizer's size is the vocabulary checked against
        config["vocab_size"] = facts.vocab_size
    return dataclasses.replace(settings, **updates), config, facts.tokens_per_image
