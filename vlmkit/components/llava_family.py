"""Model family ``llava`` (transformers' ``LlavaForConditionalGeneration``): config mapping both
ways and checkpoint layout. Built from the ``clip`` tower, the ``mlp`` connector and a ``llama``
(or any causal-LM) text model; the core is unchanged by this module.

- ``vision_config`` -> the ``clip`` tower, with the top-level ``vision_feature_layer`` and
  ``vision_feature_select_strategy``; ``projector_hidden_act`` / ``multimodal_projector_bias``
  -> the ``mlp`` connector; ``image_token_index`` -> the packer's placeholder, which the
  processor expands to one placeholder per visual token (patches, plus the class token with
  ``full``); ``text_config`` -> the backbone.
- Checkpoints: transformers 5 saves ``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.model.*`` and ``language_model.lm_head.weight``; published llava-hf and
  transformers 4.x files keep the tower under ``vision_tower.vision_model.``. The file read decides.

- Processor: :meth:`LlavaFamily.image_processing` supplies the CLIP image processing and the
  token cost of each image, :meth:`LlavaFamily.prompt_layout` the ``<image>`` expansion (both in
  :mod:`vlmkit.components.llava_processing`); the core processor delegates to them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import SpecError, short_repr
from ..family import Family
from ..hookspecs import hookimpl
from ..keymap import KeyMap
from .llava_processing import LlavaImageProcessing, LlavaLayout, read_llava_processing

__all__ = ["LlavaFamily"]

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")  # fmt: skip
TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id",
)  # fmt: skip
#: transformers' LlavaConfig defaults for keys a config may leave out.
DEFAULTS = {"image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True}  # fmt: skip


def _section(config: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise SpecError(f"expected a mapping of settings, got {short_repr(value)}", key_path=key, source=source,
                        hint="restore config.json from the checkpoint; every llava config has it")  # fmt: skip
    return value


def _top(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, DEFAULTS[key])


def _backbone(config: Mapping[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    tie = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if text.get("model_type", "llama") != "llama":
        return {"name": "hf_causal_lm", "config": text, "tie_word_embeddings": tie}
    return {"name": "llama", **{k: text[k] for k in TEXT_KEYS if text.get(k) is not None}, "tie_word_embeddings": tie}


class LlavaFamily(Family):
    """The ``llava`` family."""

    name = "llava"
    model_types = ("llava",)
    sections = {"vision_tower": "vision_config", "backbone": "text_config"}
    prefixes = {
        "vision_tower": "vision_tower.",
        "connector": "multi_modal_projector.",
        "backbone": {"lm_head.": "language_model.lm_head.", "": "language_model.model."},
    }
    has_processor = True

    def image_processing(self, folder, preprocessor_config, processor_config, config) -> LlavaImageProcessing:  # noqa: ANN001
        """CLIP resize / center crop, one tile per image (see :mod:`.llava_processing`)."""
        return read_llava_processing(Path(folder), preprocessor_config, processor_config, config)

    def prompt_layout(self, tokenizer, settings, vocab_rows: int) -> LlavaLayout:  # noqa: ANN001 - see Family
        """``settings`` is this family's :class:`LlavaImageProcessing`: its ``image_token``, repeated."""
        if not isinstance(settings, LlavaImageProcessing):
            raise SpecError("the llava family reads its images with its own image processing, not tiled settings",
                            hint="load the processor from a llava checkpoint folder")  # fmt: skip
        return LlavaLayout(settings.image_token)

    def spec_from_config(self, config: dict[str, Any], folder: Path | None, source: str) -> dict[str, Any]:
        vision = _section(config, "vision_config", source)
        text = _section(config, "text_config", source)
        return {
            "vision_tower": {"name": "clip", **{k: vision[k] for k in VISION_KEYS if vision.get(k) is not None},
                             "vision_feature_layer": _top(config, "vision_feature_layer"),
                             "vision_feature_select_strategy": _top(config, "vision_feature_select_strategy")},
            "connector": {"name": "mlp", "projector_hidden_act": _top(config, "projector_hidden_act"),
                          "multimodal_projector_bias": _top(config, "multimodal_projector_bias")},
            "aligner": {"name": "hidden_align"},
            "packer": {"name": "image_packer", "image_token_id": _top(config, "image_token_index")},
            "backbone": _backbone(config, text),
        }  # fmt: skip

    def key_map(self, slot: str, keymap: KeyMap, checkpoint_keys: Collection[str] = ()) -> KeyMap:
        if slot == "vision_tower" and any(k.startswith("vision_tower.vision_model.") for k in checkpoint_keys):
            return keymap.with_prefixes("vision_tower.vision_model.")  # published llava-hf / transformers 4.x files
        return super().key_map(slot, keymap, checkpoint_keys)

    def config_from_spec(self, spec) -> dict[str, Any] | None:  # noqa: ANN001 - see Family
        """``LlavaForConditionalGeneration``'s config for clip + mlp + identity aligner + llama."""
        names = (spec.vision_tower.name, spec.connector.name, spec.aligner.name, spec.packer.name, spec.backbone.name)
        if names != ("clip", "mlp", "hidden_align", "image_packer", "llama"):
            return None
        vision = spec.vision_tower.params.model_dump(mode="json")
        connector = spec.connector.params.model_dump(mode="json")
        text = {k: v for k, v in spec.backbone.params.model_dump(mode="json").items() if v is not None}
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": spec.packer.params.image_token_id,
            "vision_feature_layer": vision.pop("vision_feature_layer"),
            "vision_feature_select_strategy": vision.pop("vision_feature_select_strategy"),
            "projector_hidden_act": connector["projector_hidden_act"],
            "multimodal_projector_bias": connector["multimodal_projector_bias"],
            "tie_word_embeddings": text["tie_word_embeddings"],
            "vision_config": {"model_type": "clip_vision_model", **vision},
            "text_config": {"model_type": "llama", **text},
        }


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register the :class:`LlavaFamily`."""
    registry.add_family(LlavaFamily())
