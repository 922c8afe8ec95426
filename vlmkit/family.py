"""Model families: what one family of checkpoints decides, answered by one plugin object.

The core never names a family. Where it needs a family's answer it looks the family up by the
checkpoint's ``config.json`` ``model_type`` (:func:`family_for_config`) and asks it:

- :meth:`Family.spec_from_config` / :meth:`Family.config_from_spec`: ``config.json`` <-> spec, both
  directions (loading, and ``save_pretrained`` / export);
- :attr:`Family.sections` and :meth:`Family.config_key_path`: where each slot's settings live in
  ``config.json``, so an error names the key a user can find there (``text_config.hidden_size``,
  not ``backbone.hidden_size``);
- :meth:`Family.prompt_layout`: how an image is written into the prompt (placeholder, tile
  tokens, global image), checked against the checkpoint's tokenizer;
- :meth:`Family.image_processing`: how an image becomes pixels and what it costs, when the
  family's image processor is not the core's tiled one (``None``: the tiled default);
- :meth:`Family.video_layout`: how a video is sampled and written into the prompt (``None``: the
  checkpoint takes no video);
- :meth:`Family.stop_tokens`: tokens that end a turn, besides the files' ``eos_token_id``;
- :attr:`Family.bundled`: config folders shipped with the plugin for offline use.

A plugin registers an instance from its ``vlmkit_register_components`` hook::

    @vlmkit.hookimpl
    def vlmkit_register_components(registry):
        registry.add_family(MyFamily())

See docs/writing-plugins.md ("A model family").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import SpecError
from .keymap import KeyMap

if TYPE_CHECKING:
    from .processor.image import ImageCost, ImageSettings
    from .processor.text import TextTokenizer
    from .processor.video import VideoPlan, VideoSampling
    from .spec import VLMSpec

__all__ = ["Family", "ImageProcessing", "PromptLayout", "VideoLayout", "family_for_config", "bundled_folder", "checkpoint_key_map"]


class PromptLayout(Protocol):
    """How a family writes one image into the prompt text.

    ``image`` is the placeholder users write (``<image>``); :meth:`expand` gives the text that
    replaces one placeholder for an image whose tiling is ``cost``; :meth:`fits` says whether the
    tokenizer has the tokens that tiling needs; ``tokens`` every token string :meth:`expand` can
    write (the placeholder included; training never takes them as labels).
    """

    image: str
    tokens: tuple[str, ...]

    def expand(self, cost: ImageCost, image_seq_len: int) -> str:
        """The text that replaces one image placeholder (``image_seq_len`` image tokens per tile)."""
        ...

    def fits(self, cost: ImageCost) -> bool:
        """Whether the tokenizer has a token for every tile position of ``cost``."""
        ...


class ImageProcessing(Protocol):
    """A family's own image processor, which the processor delegates one image at a time to.

    ``settings`` are the checkpoint's image settings (whatever type the family uses; the
    family's :meth:`Family.prompt_layout` receives them); ``image_seq_len`` the visual tokens of
    an image at the checkpoint's nominal size; ``input_size`` the ``(height, width)`` of the pixels
    the vision tower receives per image at that size (what :attr:`Processor.input_size
    <vlmkit.processor.Processor.input_size>` answers); ``keywords`` the per-call image keywords of
    :data:`vlmkit.processor.options.CALL_KEYWORDS` it takes (any other image keyword is a
    :class:`~vlmkit.errors.ProcessorError` naming it).
    """

    settings: Any
    image_seq_len: int
    input_size: tuple[int, int]
    keywords: frozenset[str]

    def call_settings(self, options: Mapping[str, Any]) -> Any:
        """``settings`` with one call's checked image keywords applied."""
        ...

    def plan(self, size: tuple[int, int], settings: Any) -> ImageCost:
        """The cost of an image of ``size = (height, width)``, from its size alone (no pixel work)."""
        ...

    def encode(self, image: Any, cost: ImageCost, settings: Any, where: str) -> Any:
        """One image -> float32 ``(n_tiles, 3, H, W)`` following ``cost`` (``where`` names it in errors)."""
        ...


class VideoLayout(Protocol):
    """How a family samples a video and writes it into the prompt.

    ``video`` is the placeholder users write (``<video>``); ``sampling`` the checkpoint's frame
    sampling; :meth:`expand` the text that replaces one placeholder (each frame costs
    ``image_seq_len`` image tokens); ``chat_template`` the template a conversation with a video
    part is rendered with (``None``: the checkpoint's own).
    """

    video: str
    sampling: VideoSampling
    chat_template: str | None

    def expand(self, plan: VideoPlan, image_seq_len: int) -> str:
        """The text that replaces one video placeholder for the frames of ``plan``."""
        ...


class Family:
    """What a model family decides. Subclass it, set the class attributes, override the methods.

    Attributes:
        name: the family's name (shown by ``vlmkit plugins``).
        model_types: the ``config.json`` ``model_type`` values it reads.
        sections: slot -> the ``config.json`` section holding that slot's settings (``""`` or
            absent: top level).
        bundled: Hub repo id -> a folder of that checkpoint's config/tokenizer files shipped with
            the plugin (used when the Hub cannot be reached and no weights are needed).
        prefixes: slot -> where that slot's tensors live in this family's checkpoints: one prefix,
            or a mapping from a leading part of the component's own (prefix-free) names to its
            place (``{"lm_head.": "lm_head.", "": "model.text_model."}``; see
            :meth:`vlmkit.keymap.KeyMap.with_prefixes`). A slot not listed keeps its own names.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[Mapping[str, str]] = {}
    bundled: ClassVar[Mapping[str, Path]] = {}
    prefixes: ClassVar[Mapping[str, str | Mapping[str, str]]] = {}
    #: Whether :meth:`prompt_layout` (and so ``load_processor``) is implemented for this family.
    has_processor: ClassVar[bool] = False

    def spec_from_config(self, config: dict[str, Any], folder: Path | None, source: str) -> dict[str, Any]:
        """The YAML-form spec (five slot mappings ``{"name": ..., **params}``) of ``config``.

        ``folder`` holds the checkpoint's other files for cross-checks (``None``: config only);
        ``source`` names ``config.json`` in errors. Raise :class:`~vlmkit.errors.SpecError`.
        """
        raise NotImplementedError(f"family {self.name!r} cannot read config.json files")

    def config_from_spec(self, spec: VLMSpec) -> dict[str, Any] | None:
        """The transformers ``config.json`` for ``spec``, or ``None`` when this family's
        transformers class cannot represent the spec's slot combination."""
        return None

    def config_key_path(self, key_path: str | None) -> str | None:
        """A spec key path (``backbone.hidden_size``) as a ``config.json`` one (``text_config.hidden_size``)."""
        slot, _, rest = (key_path or "").partition(".")
        if not slot or slot not in {"vision_tower", "connector", "aligner", "packer", "backbone"}:
            return key_path
        section = self.sections.get(slot, "")
        if not rest:
            return section or key_path
        return f"{section}.{rest}" if section else rest

    def config_error(self, exc: SpecError, source: str) -> SpecError:
        """``exc`` with its key path in ``config.json`` terms, naming ``source``."""
        return SpecError(exc.detail, key_path=self.config_key_path(exc.key_path), source=source, hint=exc.hint)

    def key_map(self, slot: str, keymap: KeyMap, checkpoint_keys: Collection[str] = ()) -> KeyMap:
        """``keymap`` (a component's prefix-free names) placed where this family's checkpoints keep
        ``slot``. ``checkpoint_keys`` (the names in the file being read, when there is one) lets a
        family whose files come in several layouts pick the right one."""
        prefixes = self.prefixes.get(slot)
        return keymap if prefixes is None else keymap.with_prefixes(prefixes)

    def prompt_layout(self, tokenizer: TextTokenizer, settings: ImageSettings | ImageProcessing,
                      vocab_rows: int) -> PromptLayout:  # fmt: skip
        """The prompt layout of images for this checkpoint's ``tokenizer``; raise
        :class:`~vlmkit.errors.SpecError` when the tokenizer lacks the tokens it needs.
        ``settings`` are the tiled image settings, or this family's :meth:`image_processing` object."""
        from .errors import ProcessorError

        raise ProcessorError(f"the {self.name!r} model family has no prompt layout for images")

    def image_processing(
        self,
        folder: Path,
        preprocessor_config: Mapping[str, Any] | None,
        processor_config: Mapping[str, Any] | None,
        config: Mapping[str, Any] | None,
    ) -> ImageProcessing | None:
        """This checkpoint's image processing, read from its files (``None`` when absent), or
        ``None`` for the core's tiled image processor (``preprocessor_config.json`` with
        ``size.longest_edge`` / ``max_image_size``). Raise :class:`~vlmkit.errors.SpecError`."""
        return None

    def video_layout(
        self, tokenizer: TextTokenizer, image_layout: PromptLayout, preprocessor_config: Mapping[str, Any], source: str
    ) -> VideoLayout | None:
        """The video layout of this checkpoint (``preprocessor_config`` is preprocessor_config.json,
        named ``source`` in errors), or ``None`` when it takes no video."""
        return None

    def stop_tokens(self, tokenizer_config: Mapping[str, Any]) -> tuple[str, ...]:
        """Token strings that end a turn besides the files' ``eos_token_id`` (e.g. a chat
        template's turn separator); each is looked up in the tokenizer."""
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {', '.join(self.model_types)}>"


def family_for_config(config: Mapping[str, Any] | None) -> Family | None:
    """The registered family that reads ``config["model_type"]``, or ``None``."""
    from .plugins import get_registry

    model_type = (config or {}).get("model_type")
    return get_registry().family(model_type) if isinstance(model_type, str) else None


def bundled_folder(repo_id: str) -> Path | None:
    """The folder of config files a registered family ships for ``repo_id``, or ``None``."""
    from .plugins import get_registry

    for family in get_registry().families():
        folder = family.bundled.get(repo_id)
        if folder is not None:
            return Path(folder)
    return None


def checkpoint_key_map(family: Family | None, slot: str, keymap: KeyMap, checkpoint_keys: Collection[str] = ()) -> KeyMap:
    """``keymap`` in the layout of ``family``'s checkpoints; without a family (a folder with no
    known ``config.json``, e.g. a plain timm or transformers sub-model file) the component's own names."""
    return keymap if family is None else family.key_map(slot, keymap, checkpoint_keys)
