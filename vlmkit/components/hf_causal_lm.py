"""Backbone ``hf_causal_lm``: any transformers ``AutoModelForCausalLM`` (Llama, Qwen2, Mistral...).

Built from the Hugging Face text config (``text_config`` of a VLM checkpoint) with
``AutoConfig.for_model(**config)`` and ``AutoModelForCausalLM.from_config``, in float32.
transformers is imported only when this backbone is built (or its params validated), never when
vlmkit is imported.

Local ``state_dict`` names are transformers' own: ``model.*`` (the decoder) and
``lm_head.weight``. The key map sends ``model.X`` to the prefix-free ``X`` and keeps
``lm_head.weight``; the checkpoint's family places both. With tied embeddings there is no head rule.

It implements the :class:`~vlmkit.protocols.Backbone` protocol and has **no**
``generate_from_embeds``: :meth:`HFCausalLMBackbone.generate` hands ``inputs_embeds`` to
transformers' own ``generate``, i.e. the second step of :mod:`vlmkit.generation`'s fallback chain.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from ..errors import GenerationError
from ..hookspecs import hookimpl
from ..keymap import KeyMap, KeyRule
from ..protocols import TextWidths

__all__ = ["HFCausalLMParams", "HFCausalLMBackbone", "vlmkit_register_components"]


class HFCausalLMParams(BaseModel):
    """``config``: the Hugging Face text config (must hold ``model_type``); ``tie_word_embeddings``:
    override the config's value (``None`` keeps it)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    tie_word_embeddings: bool | None = None

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        model_type = value.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError("config needs a 'model_type' (e.g. 'llama', 'qwen2', 'mistral')")
        _check_causal(value)
        _hf_config(value, None)  # unknown model types / bad values fail at spec time
        return value


def _check_causal(config: dict[str, Any]) -> None:
    """Refuse a text ``model_type`` that is not a causal (left-to-right) decoder in transformers:
    an encoder such as bert is one only with ``is_decoder: true``; t5/clip are none."""
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES as masked,
        )
    except ImportError:  # pragma: no cover - no transformers: _hf_config says so
        return
    model_type = config["model_type"]
    if model_type not in causal:
        raise ValueError(
            f"model_type {model_type!r} is not a causal language model in transformers (no AutoModelForCausalLM "
            f"class), so it cannot generate text; the text model of a VLM must be a decoder such as "
            f"{', '.join(t for t in ('llama', 'qwen2', 'mistral', 'gemma') if t in causal)}"
        )
    if model_type in masked and not config.get("is_decoder"):
        raise ValueError(
            f"model_type {model_type!r} is a bidirectional encoder unless its config says is_decoder: true "
            "(transformers would build it looking at future tokens); add is_decoder: true to the text config, "
            "or use a decoder model type such as llama"
        )


def _hf_config(config: dict[str, Any], tie: bool | None):
    try:
        from transformers import AutoConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("the hf_causal_lm backbone needs transformers (pip install 'vlmkit[hf]')") from exc
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        cfg = AutoConfig.for_model(config["model_type"], **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"transformers cannot build a config for model_type={config['model_type']!r}: {exc}") from None
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cfg


def _widths(cfg: Any) -> TextWidths:
    return TextWidths(hidden_size=int(cfg.hidden_size), vocab_size=int(cfg.vocab_size))


def _default_device_is_meta() -> bool:
    return torch.empty(0).device.type == "meta"


class HFCausalLMBackbone(nn.Module):
    """A transformers causal LM in the ``backbone`` slot. Built as ``HFCausalLMBackbone(params)``.

    Submodules ``model`` (the decoder) and ``lm_head`` are the transformers model's own; the
    wrapping ``*ForCausalLM`` object is kept (not as a submodule) for :meth:`generate`.
    """

    Params: ClassVar[type[HFCausalLMParams]] = HFCausalLMParams

    def __init__(self, params: HFCausalLMParams | dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(params, HFCausalLMParams):
            params = HFCausalLMParams.model_validate(params)
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.params = params
        cfg = _hf_config(params.config, params.tie_word_embeddings)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        # A clean generation config: every knob comes from vlmkit.generation explicitly.
        hf.generation_config = GenerationConfig()
        object.__setattr__(self, "_hf", hf)  # not a submodule: its parameters are model/lm_head's
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        self.model = decoder if decoder is not None else hf.model
        self.lm_head = hf.get_output_embeddings()
        self.config = cfg
        widths = _widths(cfg)
        self.hidden_size = widths.hidden_size
        self.vocab_size = widths.vocab_size
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self._buffers_pending = _default_device_is_meta()
        # transformers >= 5.x names the cache argument `cache` (`past_key_values` is deprecated).
        accepted = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    @classmethod
    def widths(cls, params: HFCausalLMParams) -> TextWidths:
        """The declared facts (:class:`vlmkit.protocols.DeclaresWidths`): the text config's
        ``hidden_size`` / ``vocab_size`` (transformers' config defaults filled in; no model built)."""
        return _widths(_hf_config(params.config, params.tie_word_embeddings))

    # ------------------------------------------------------------------------- weights
    def key_map(self) -> KeyMap:
        """``model.X`` <- ``X`` (the decoder's names without a prefix); ``lm_head.weight`` under its
        own name (untied only). The checkpoint's family places them."""
        prefix, head = "", "lm_head.weight"
        rules = []
        for key in self.state_dict(keep_vars=True):
            if key.startswith("model."):
                rules.append(KeyRule(key, (prefix + key[len("model.") :],)))
            elif key == "lm_head.weight":
                if not self.tie_word_embeddings:
                    rules.append(KeyRule(key, (head,)))
            else:
                rules.append(KeyRule(key, (key,)))
        return KeyMap(rules)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001
        """As ``nn.Module.load_state_dict``, then re-tie the head to the embedding (``assign=True``
        replaces the embedding parameter, which would untie it)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._retie()
        return result

    def _retie(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.get_input_embeddings().weight

    def reset_parameters(self) -> None:
        """transformers' own initialisation of the whole model."""
        self._materialize_buffers()
        for p in self.parameters():
            if hasattr(p, "_is_hf_initialized"):
                del p._is_hf_initialized
        init = getattr(self._hf, "init_weights", None) or self._hf.initialize_weights
        init()
        self._retie()

    def _materialize_buffers(self) -> None:
        """Give non-persistent buffers built on the meta device (RoPE ``inv_freq``...) real values,
        with transformers' own ``_init_weights`` for their modules (parameters untouched)."""
        if not self._buffers_pending:
            return
        self._buffers_pending = False
        todo = []
        for module in self._hf.modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]  # noqa: SLF001
            if metas:
                for name in metas:
                    module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")  # noqa: SLF001
                todo.append(module)
        if not todo:
            return
        flagged = [p for p in self._hf.parameters() if not getattr(p, "_is_hf_initialized", False)]
        for p in flagged:
            p._is_hf_initialized = True  # protect loaded weights from re-initialisation
        try:
            for module in todo:
                self._hf._init_weights(module)  # noqa: SLF001
        finally:
            for p in flagged:
                del p._is_hf_initialized

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module internals
        self._materialize_buffers()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> HFCausalLMBackbone:
        super().train(mode)
        self._hf.train(mode)
        return self

    # ------------------------------------------------------------------------- protocol
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` long -> ``(B, T, D)``."""
        return self.model.get_input_embeddings()(input_ids)

    def new_cache(self, batch_size: int, max_length: int, **_: Any):
        """A transformers ``DynamicCache`` (grows as needed; ``max_length`` is not preallocated)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """``(B, T, D)`` -> last hidden state ``(B, T, D)`` (after the final norm).

        ``attention_mask`` ``(B, T_past + T)`` 0/1; ``position_ids`` ``(B, T)`` (default: after
        the cache); ``cache`` a transformers ``Cache`` (e.g. :meth:`new_cache`), updated in place.
        """
        self._materialize_buffers()
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, V)``."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' ``generate`` on this model. With ``inputs_embeds`` it returns only the
        new tokens ``(B, T_new)`` (transformers' layout); with ``input_ids``, prompt + new."""
        self._materialize_buffers()
        if inputs_embeds is None and input_ids is None:
            raise GenerationError("hf_causal_lm generate() needs inputs_embeds or input_ids")
        from transformers import GenerationConfig

        streamer = kwargs.pop("streamer", None)
        config = GenerationConfig(**kwargs)
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
        return self._hf.generate(**inputs, attention_mask=attention_mask, generation_config=config, streamer=streamer)

    def extra_repr(self) -> str:
        return f"model_type={self.config.model_type}, hidden={self.hidden_size}, vocab={self.vocab_size}, tied={self.tie_word_embeddings}"


@hookimpl
def vlmkit_register_components(registry: Any) -> None:
    """Register :class:`HFCausalLMBackbone` as the ``hf_causal_lm`` backbone."""
    registry.add_backbone("hf_causal_lm", HFCausalLMBackbone)
