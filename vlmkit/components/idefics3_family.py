"""Model family ``idefics3`` / ``smolvlm`` (Idefics3, SmolVLM, SmolVLM2): everything the family decides.

- ``config.json`` <-> spec (:func:`spec_dict_from_config`; :meth:`Idefics3Family.config_from_spec`
  for export), with the config sections of each slot for error key paths;
- the prompt layout of images (:mod:`vlmkit.components.idefics3_layout`) and of SmolVLM2 videos
  (:mod:`vlmkit.components.idefics3_video`), and the turn separator
  ``<end_of_utterance>`` as a stop token;
- the published SmolVLM / SmolVLM2 config files bundled with vlmkit, for offline use.

Every number comes from the checkpoint's files; transformers' defaults for these model types
fill keys a config leaves out (the SmolVLM2 configs omit several). Cross-checks:

- ``scale_factor`` vs ``text_config.pixel_shuffle_factor``;
- tokens per image ``(image_size / patch_size)^2 / scale_factor^2`` vs
  ``text_config.perceiver_config.resampler_n_latents`` and processor_config.json ``image_seq_len``;
- ``image_token_id`` inside ``text_config.vocab_size``; top-level ``vocab_size`` vs the text one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import SpecError, divisors, short_repr
from ..family import Family
from ..hookspecs import hookimpl
from ..hub import read_json
from .idefics3_connector import tokens_per_image
from .idefics3_layout import image_layout, layout_token_names
from .idefics3_video import video_layout, video_sampling

__all__ = ["MODEL_TYPES", "BUNDLED", "Idefics3Family", "spec_dict_from_config"]

_DATA = Path(__file__).resolve().parents[1] / "data" / "hf-configs"
#: Hub repo ids whose config/tokenizer files ship inside vlmkit (no weights).
BUNDLED = {
    f"HuggingFaceTB/{name}": _DATA / name
    for name in ("SmolVLM-256M-Instruct", "SmolVLM-500M-Instruct", "SmolVLM2-256M-Video-Instruct", "SmolVLM2-500M-Video-Instruct")
}

#: ``model_type`` values this family answers, with transformers' top-level defaults.
MODEL_TYPES = {"idefics3": {"image_token_id": 128257, "scale_factor": 2}, "smolvlm": {"image_token_id": 128257, "scale_factor": 2}}

VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
)  # fmt: skip
TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id",
)  # fmt: skip


def _section(config: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    if key not in config:
        raise SpecError(
            f"missing section: an {config.get('model_type')} config.json needs {key} (a mapping of its settings)",
            key_path=key, source=source, hint="restore config.json from the checkpoint; every published one has it",
        )
    value = config[key]
    if not isinstance(value, dict):
        raise SpecError(f"expected a mapping, got {type(value).__name__} {value!r:.60}", key_path=key, source=source)
    return value


def _positive_int(value: Any, key_path: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"expected a positive integer, got {short_repr(value)}", key_path=key_path, source=source,
                        hint="write a whole number without quotes or a decimal point, as in the published config.json")  # fmt: skip
    return value


def _pick(section: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: section[k] for k in keys if section.get(k) is not None}


def _tokens_per_image(vision: dict[str, Any], scale: int, source: str) -> int:
    image_size = _positive_int(vision.get("image_size", 224), "vision_config.image_size", source)
    patch_size = _positive_int(vision.get("patch_size", 32), "vision_config.patch_size", source)
    if image_size < patch_size:
        raise SpecError(
            f"image_size {image_size} is smaller than patch_size {patch_size}: no patch fits",
            key_path="vision_config.image_size", source=source,
        )
    grid = image_size // patch_size
    if grid % scale:
        valid = divisors(grid)
        raise SpecError(
            f"scale_factor {scale} does not divide the {grid}x{grid} patch grid "
            f"(image_size {image_size} / patch_size {patch_size}); valid scales: {valid}",
            key_path="scale_factor", source=source,
        )
    return tokens_per_image(grid, scale)


def _cross_check_scale(config: dict[str, Any], text: dict[str, Any], source: str) -> int:
    scale = _positive_int(config.get("scale_factor", MODEL_TYPES[config["model_type"]]["scale_factor"]), "scale_factor", source)
    shuffle = text.get("pixel_shuffle_factor")
    if shuffle is not None and shuffle != scale:
        raise SpecError(
            f"scale_factor is {scale} but text_config.pixel_shuffle_factor is {short_repr(shuffle)}",
            key_path="text_config.pixel_shuffle_factor", source=source,
            hint="the two must agree; the connector uses scale_factor",
        )
    return scale


def _cross_check_tokens(tokens: int, text: dict[str, Any], folder: Path | None, source: str) -> None:
    perceiver = text.get("perceiver_config")
    latents = perceiver.get("resampler_n_latents") if isinstance(perceiver, dict) else None
    if latents is not None and latents != tokens:
        raise SpecError(
            f"resampler_n_latents is {short_repr(latents)} but the image grid and scale_factor give {tokens} tokens per image",
            key_path="text_config.perceiver_config.resampler_n_latents", source=source,
        )
    if folder is None:
        return
    proc = read_json(folder, "processor_config.json", required=False)
    seq = (proc or {}).get("image_seq_len")
    proc_path = str(Path(folder) / "processor_config.json")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise SpecError(f"expected a positive integer, got {short_repr(seq)}", key_path="image_seq_len", source=proc_path,
                        hint="write a whole number without quotes, as in the published processor_config.json")  # fmt: skip
    if seq is not None and seq != tokens:
        raise SpecError(
            f"processor_config.json image_seq_len is {seq} but config.json gives {tokens} tokens per image "
            "((image_size / patch_size)^2 / scale_factor^2)",
            key_path="image_seq_len", source=proc_path,
            hint="the checkpoint files contradict each other; fix image_seq_len or the vision config",
        )


def _backbone(config: dict[str, Any], text: dict[str, Any], source: str) -> dict[str, Any]:
    text_type = text.get("model_type", "llama")
    if text_type != "llama":
        return {"name": "hf_causal_lm", "config": text, "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}
    backbone = {"name": "llama", **_pick(text, TEXT_KEYS)}
    tie = bool(config.get("tie_word_embeddings", False))
    if "tie_word_embeddings" in text and bool(text["tie_word_embeddings"]) != tie:
        warnings.warn(
            f"{source}: tie_word_embeddings is {tie} at the top level but {short_repr(text['tie_word_embeddings'])} in "
            "text_config; the top-level value wins (as in transformers' Idefics3ForConditionalGeneration)",
            stacklevel=3,
        )
    backbone["tie_word_embeddings"] = tie
    top_vocab = config.get("vocab_size")
    if top_vocab is not None and "vocab_size" in text and top_vocab != text["vocab_size"]:
        raise SpecError(
            f"vocab_size is {short_repr(top_vocab)} but text_config.vocab_size is {short_repr(text['vocab_size'])}",
            key_path="vocab_size", source=source,
        )
    return backbone


def spec_dict_from_config(config: dict[str, Any], folder: Path | None = None, source: str = "config.json") -> dict[str, Any]:
    """The YAML-form spec of an Idefics3/SmolVLM ``config.json`` (validated later by the caller)."""
    vision = _section(config, "vision_config", source)
    text = _section(config, "text_config", source)
    scale = _cross_check_scale(config, text, source)
    tokens = _tokens_per_image(vision, scale, source)
    _cross_check_tokens(tokens, text, folder, source)
    backbone = _backbone(config, text, source)
    image_token_id = config.get("image_token_id", MODEL_TYPES[config["model_type"]]["image_token_id"])
    vocab = backbone.get("vocab_size", text.get("vocab_size", 32000))
    if isinstance(image_token_id, int) and isinstance(vocab, int) and not 0 <= image_token_id < vocab:
        raise SpecError(
            f"image_token_id {image_token_id} is outside the vocabulary (text_config.vocab_size {vocab})",
            key_path="image_token_id", source=source,
        )
    return {
        "vision_tower": {"name": "navit", **_pick(vision, VISION_KEYS)},
        "connector": {"name": "idefics3", "scale_factor": scale},
        "aligner": {"name": "hidden_align"},
        "packer": {"name": "image_packer", "image_token_id": image_token_id, "tokens_per_image": tokens},
        "backbone": backbone,
    }


class Idefics3Family(Family):
    """The ``idefics3`` / ``smolvlm`` family (transformers' ``Idefics3ForConditionalGeneration``)."""

    name = "idefics3"
    model_types = tuple(MODEL_TYPES)
    sections = {"vision_tower": "vision_config", "backbone": "text_config"}
    bundled = BUNDLED
    has_processor = True
    prefixes = {
        "vision_tower": "model.vision_model.",
        "connector": "model.connector.",
        "aligner": "model.aligner.",
        "backbone": {"lm_head.": "lm_head.", "": "model.text_model."},
    }

    def spec_from_config(self, config: dict[str, Any], folder: Path | None, source: str) -> dict[str, Any]:
        return spec_dict_from_config(config, folder, source=source)

    def prompt_layout(self, tokenizer, settings, vocab_rows: int):  # noqa: ANN001 - see Family
        return image_layout(tokenizer, settings, vocab_rows)

    def video_layout(self, tokenizer, image_layout, preprocessor_config, source: str):  # noqa: ANN001 - see Family
        """SmolVLM2's frames-with-timestamps layout when preprocessor_config.json has ``video_sampling``."""
        sampling = video_sampling(preprocessor_config, source)
        return None if sampling is None else video_layout(tokenizer.config, image_layout, sampling)

    def stop_tokens(self, tokenizer_config) -> tuple[str, ...]:  # noqa: ANN001 - see Family
        """``<end_of_utterance>`` (or its override in tokenizer_config.json) closes every chat turn."""
        return (layout_token_names(tokenizer_config)["end_of_utterance_token"],)

    def config_from_spec(self, spec) -> dict[str, Any] | None:  # noqa: ANN001 - see Family
        """Idefics3 ``config.json`` for navit + idefics3 connector + identity aligner + llama."""
        names = (spec.vision_tower.name, spec.connector.name, spec.aligner.name, spec.packer.name, spec.backbone.name)
        if names != ("navit", "idefics3", "hidden_align", "image_packer", "llama"):
            return None  # the idefics3 connector always projects to the text width: the aligner is the identity
        text = spec.backbone.params.model_dump(mode="json")
        tie = text.pop("tie_word_embeddings")
        if text.get("hidden_size") is None:
            return None
        vision = spec.vision_tower.params.model_dump(mode="json")
        return {
            "architectures": ["Idefics3ForConditionalGeneration"],
            "model_type": "idefics3",
            "image_token_id": spec.packer.params.image_token_id,
            "scale_factor": spec.connector.params.scale_factor,
            "tie_word_embeddings": tie,
            "vocab_size": text["vocab_size"],
            "vision_config": {"model_type": "idefics3_vision", **vision},
            "text_config": {"model_type": "llama", "tie_word_embeddings": tie, **{k: v for k, v in text.items() if v is not None}},
        }


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register the :class:`Idefics3Family`."""
    registry.add_family(Idefics3Family())
