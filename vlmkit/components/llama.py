"""The Llama decoder backbone (registry name ``llama``), as used by SmolVLM / Idefics3 / SmolLM2.

Architecture: token embedding, ``num_hidden_layers`` pre-norm decoder layers (RMSNorm ->
grouped-query self-attention with rotary position embeddings -> residual; RMSNorm -> SwiGLU MLP
-> residual), a final RMSNorm and a tied or untied LM head. Attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`; MHA, GQA and MQA are the same code
(``num_key_value_heads`` = heads, a divisor, or 1).

Speed choices:

- fused ``qkv_proj`` (q, k, v rows stacked) and ``gate_up_proj`` (gate, up rows stacked): one
  matmul each instead of three and two. Checkpoints keep transformers' separate tensors; the
  :meth:`LlamaBackbone.key_map` declares fused :class:`~vlmkit.keymap.KeyRule` so the loader
  concatenates them and ``KeyMap.export`` splits them back.
- a preallocated :class:`~vlmkit.kv_cache.KVCache` written in place;
- a single-token decode step without padding builds no mask; with GQA the query heads of a group
  are folded into the query-length axis so keys/values are never repeated.
- RoPE cos/sin are computed lazily and cached per ``(device, dtype)`` as plain attributes (no
  buffers, so the module can be built on the meta device and loaded with ``assign=True``).

The building blocks (RMSNorm, ``ACTIVATIONS``, RoPE helpers and ``rope_scaling`` checks, the SDPA
mask, attention, MLP, decoder layer) live in :mod:`vlmkit.components.llama_layers` and are
re-exported here; this module keeps :class:`Params`, :class:`LlamaBackbone` (with its key map)
and the plugin hook.

Shape letters: ``B`` batch, ``T`` new tokens, ``L`` attended length (past + T), ``D`` hidden
size, ``V`` vocabulary, ``H`` query heads, ``H_kv`` key/value heads, ``d`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import nn

from .. import native
from ..decode_layout import linear_rows
from ..errors import divisors
from ..hookspecs import hookimpl
from ..keymap import KeyMap, KeyRule
from ..kv_cache import KVCache
from .llama_fused import NATIVE_SCHEMES, fused_step
from .llama_layers import (  # noqa: F401 - re-exported: these lived here before the split
    HAS_SDPA_GQA,
    ACTIVATIONS,
    SUPPORTED_ROPE_TYPES,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    RMSNorm,
    rope_cos_sin,
    normalize_rope_scaling,
    rope_inv_freq,
    sdpa_mask,
)

__all__ = ["Params", "LlamaBackbone", "KVCache", "SUPPORTED_ROPE_TYPES", "ACTIVATIONS", "vlmkit_register_components"]


# ============================================================================== params
class Params(BaseModel):
    """Settings of the Llama backbone, named as in a Hugging Face ``LlamaConfig`` (``text_config``).

    Defaults are ``LlamaConfig``'s, except ``rms_norm_eps=1e-5`` (what Idefics3/SmolVLM use).
    ``num_key_value_heads`` and ``head_dim`` may be left ``None``; they are filled in
    (``num_attention_heads`` and ``hidden_size // num_attention_heads``).

    ``rope_scaling`` is ``None`` or a dict with ``rope_type`` (or the legacy ``type``) one of
    ``default``, ``linear`` (needs ``factor``) or ``llama3`` (needs ``factor``,
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``, which
    defaults to ``max_position_embeddings``). It is stored normalised (``rope_type`` key, floats;
    ``default`` becomes ``None``). The transformers 5 ``rope_parameters`` dict (with
    ``rope_theta`` inside) is accepted as input too and split into ``rope_theta`` and
    ``rope_scaling``.
    """

    model_config = ConfigDict(extra="forbid")

    vocab_size: PositiveInt = 32000
    hidden_size: PositiveInt = 4096
    intermediate_size: PositiveInt = 11008
    num_hidden_layers: PositiveInt = 32
    num_attention_heads: PositiveInt = 32
    num_key_value_heads: PositiveInt | None = Field(default=None, description="None: same as num_attention_heads (MHA)")
    head_dim: PositiveInt | None = Field(default=None, description="None: hidden_size // num_attention_heads")
    hidden_act: str = "silu"
    max_position_embeddings: PositiveInt = 2048
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_hf(cls, text_config: Mapping[str, Any]) -> Params:
        """Params from a transformers ``LlamaConfig`` dict (e.g. ``config.json``'s ``text_config``).

        Keys this backbone has no use for (``architectures``, ``torch_dtype``, ...) are dropped;
        ``rope_parameters`` (transformers 5) is understood.
        """
        known = set(cls.model_fields) | {"rope_parameters"}
        return cls.model_validate({k: v for k, v in text_config.items() if k in known})

    @model_validator(mode="before")
    @classmethod
    def _accept_rope_parameters(cls, data: Any) -> Any:
        """Turn transformers 5's ``rope_parameters`` into ``rope_theta`` + ``rope_scaling``."""
        if not isinstance(data, Mapping) or "rope_parameters" not in data:
            return data
        data = dict(data)
        rope = data.pop("rope_parameters")
        if rope is None:
            return data
        if not isinstance(rope, Mapping):
            raise ValueError(f"rope_parameters must be a dict; got {rope!r}")
        rope = dict(rope)
        if "rope_theta" in rope:
            theta = rope.pop("rope_theta")
            if data.get("rope_theta") is not None and float(data["rope_theta"]) != float(theta):
                raise ValueError(
                    f"rope_parameters.rope_theta={theta} contradicts rope_theta={data['rope_theta']}; give one"
                )
            data["rope_theta"] = theta
        if data.get("rope_scaling") is not None:
            raise ValueError("give either rope_scaling or rope_parameters, not both")
        data["rope_scaling"] = rope
        return data

    @field_validator("hidden_act")
    @classmethod
    def _check_act(cls, value: str) -> str:
        if value not in ACTIVATIONS:
            raise ValueError(f"hidden_act={value!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
        return value

    @model_validator(mode="after")
    def _check_shapes(self) -> Params:
        heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}; "
                    f"expected a multiple of {heads}, or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = heads
        kv = self.num_key_value_heads
        if kv > heads or heads % kv:
            valid = divisors(heads)
            raise ValueError(
                f"num_key_value_heads={kv} must divide num_attention_heads={heads} (each key/value head "
                f"serves a whole group of query heads); expected one of {valid}"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary; expected 0 <= id < "
                f"vocab_size={self.vocab_size} or None"
            )
        return self


# ============================================================================== backbone
class LlamaBackbone(nn.Module):
    """A Llama decoder on embeddings (the ``backbone`` slot); see the module docstring.

    Built as ``LlamaBackbone(params)`` (a :class:`Params` or a mapping of its fields).

    State dict keys (local names): ``embed_tokens.weight``, ``layers.{i}.self_attn.qkv_proj.weight``
    (q, k, v rows stacked; ``.bias`` with ``attention_bias``), ``layers.{i}.self_attn.o_proj.weight``,
    ``layers.{i}.mlp.gate_up_proj.weight`` (gate, up rows stacked), ``layers.{i}.mlp.down_proj.weight``,
    ``layers.{i}.input_layernorm.weight``, ``layers.{i}.post_attention_layernorm.weight``,
    ``norm.weight`` and, unless ``tie_word_embeddings``, ``lm_head.weight``.

    Key map: transformers' ``LlamaModel`` names without a prefix, and ``lm_head.weight``; the
    checkpoint's family places them (``model.text_model.`` in Idefics3 files; a plain
    ``LlamaForCausalLM`` file keeps the decoder under ``model.``:
    ``key_map().with_prefixes({"lm_head.": "lm_head.", "": "model."})``).
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(params, Params):
            params = Params.model_validate(params)
        self.params = params
        self.hidden_size = params.hidden_size
        self.vocab_size = params.vocab_size
        self.num_layers = params.num_hidden_layers
        self.num_heads = params.num_attention_heads
        self.num_kv_heads = params.num_key_value_heads
        self.head_dim = params.head_dim
        self.tie_word_embeddings = params.tie_word_embeddings

        self.embed_tokens = nn.Embedding(params.vocab_size, params.hidden_size, padding_idx=params.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(params, i) for i in range(params.num_hidden_layers))
        self.norm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        self.lm_head = None if params.tie_word_embeddings else nn.Linear(params.hidden_size, params.vocab_size, bias=False)
        if not self.embed_tokens.weight.is_meta:  # meta tensors (weights to be loaded) hold no values
            self.reset_parameters()
        # Lazily filled RoPE tables: plain attributes (not buffers), keyed by device / (device, dtype).
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._rope_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """transformers-style init: normal(0, ``std``) matrices and embeddings, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # ------------------------------------------------------------------------- key map
    def key_map(self) -> KeyMap:
        """Local keys <- transformers' ``LlamaModel`` names (no prefix) and ``lm_head.weight``.

        ``q_proj``/``k_proj``/``v_proj`` fuse into ``qkv_proj`` (rows ``(H*d, H_kv*d, H_kv*d)``) and
        ``gate_proj``/``up_proj`` into ``gate_up_proj`` (rows ``(I, I)``). With tied embeddings
        there is no head rule (the head reuses ``embed_tokens.weight``).
        """
        p, prefix, head_key = self.params, "", "lm_head.weight"
        q_out, kv_out, inter = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim, p.intermediate_size
        rules = [KeyRule("embed_tokens.weight", (f"{prefix}embed_tokens.weight",))]
        suffixes = ["weight", "bias"] if p.attention_bias else ["weight"]
        mlp_suffixes = ["weight", "bias"] if p.mlp_bias else ["weight"]
        for i in range(p.num_hidden_layers):
            src = f"{prefix}layers.{i}."
            loc = f"layers.{i}."
            for s in suffixes:
                rules.append(
                    KeyRule(
                        f"{loc}self_attn.qkv_proj.{s}",
                        tuple(f"{src}self_attn.{n}_proj.{s}" for n in "qkv"),
                        rows=(q_out, kv_out, kv_out),
                    )
                )
                rules.append(KeyRule(f"{loc}self_attn.o_proj.{s}", (f"{src}self_attn.o_proj.{s}",)))
            for s in mlp_suffixes:
                rules.append(
                    KeyRule(
                        f"{loc}mlp.gate_up_proj.{s}",
                        (f"{src}mlp.gate_proj.{s}", f"{src}mlp.up_proj.{s}"),
                        rows=(inter, inter),
                    )
                )
                rules.append(KeyRule(f"{loc}mlp.down_proj.{s}", (f"{src}mlp.down_proj.{s}",)))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                rules.append(KeyRule(f"{loc}{norm}.weight", (f"{src}{norm}.weight",)))
        rules.append(KeyRule("norm.weight", (f"{prefix}norm.weight",)))
        if not p.tie_word_embeddings:
            rules.append(KeyRule("lm_head.weight", (head_key,)))
        return KeyMap(rules)

    # ------------------------------------------------------------------------- cache
    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A :class:`KVCache` for ``batch_size`` rows and up to ``max_length`` positions.

        ``dtype``/``device`` default to those of the embedding weight.
        """
        weight = self.embed_tokens.weight
        return KVCache(
            self.num_layers,
            batch_size,
            self.num_kv_heads,
            max_length,
            self.head_dim,
            dtype=dtype or weight.dtype,
            device=device if device is not None else weight.device,
        )

    # ------------------------------------------------------------------------- rope
    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        inv = self._inv_freq.get(device)
        if inv is None:
            inv = self._inv_freq[device] = rope_inv_freq(self.params).to(device)
        return inv

    def rope(
        self, position_ids: torch.Tensor | None, start: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, ``(B|1, T, 1, d)`` in ``dtype``.

        Without ``position_ids`` the positions are ``start .. start+length-1``, sliced from a table
        cached per ``(device, dtype)`` that grows (doubling) as needed. Explicit ``(B, T)``
        ``position_ids`` are computed directly (no host sync).
        """
        if position_ids is not None:
            freqs = position_ids[..., None].float() * self._inv_freq_on(device)
            cos, sin = rope_cos_sin(freqs, dtype)
            if cos.dim() == 2:
                cos, sin = cos[None], sin[None]
            return cos[:, :, None, :], sin[:, :, None, :]
        end = start + length
        key = (device, dtype)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < end:
            size = max(end, 256, 2 * table[0].shape[0] if table is not None else 0)
            pos = torch.arange(size, device=device, dtype=torch.int64).float()
            table = self._rope_tables[key] = rope_cos_sin(torch.outer(pos, self._inv_freq_on(device)), dtype)
        return table[0][None, start:end, None, :], table[1][None, start:end, None, :]

    # ------------------------------------------------------------------------- mask
    #: ``(bool mask (B|1, 1, T, L) or None, is_causal)`` for SDPA: :func:`~vlmkit.components.llama_layers.sdpa_mask`.
    _mask = staticmethod(sdpa_mask)

    # ------------------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` long -> ``(B, T, D)``."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the decoder. Returns hidden states ``(B, T, D)`` after the final norm.

        Args:
            inputs_embeds: ``(B, T, D)``.
            attention_mask: optional 0/1 ``(B, T_past + T)``; 0 marks padding (left or right).
                ``None`` means no padding.
            position_ids: optional ``(B, T)`` RoPE positions; default ``arange(T_past, T_past + T)``.
                With left padding pass e.g. ``attention_mask.cumsum(-1) - 1`` (clamped at 0).
            cache: optional :class:`KVCache` from :meth:`new_cache`; the new keys/values are written
                at ``[cache.length, cache.length + T)`` and ``cache.length`` grows by ``T``.
        """
        B, T, _ = inputs_embeds.shape
        past = 0
        if cache is not None:
            cache.check(B, T)
            past = cache.length
        device = inputs_embeds.device
        mask, is_causal = self._mask(attention_mask, B, T, past, device)
        cos, sin = self.rope(position_ids, past, T, device, inputs_embeds.dtype)
        h = None
        if T == 1 and mask is None and cache is not None and not torch.is_grad_enabled() and device.type == "cpu":
            h = fused_step(self, inputs_embeds, cos, sin, cache)  # one native call; None: run the modules
        if h is None:
            h = inputs_embeds
            for layer in self.layers:
                h = layer(h, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, V)``; the tied head reuses ``embed_tokens.weight``.

        An untied head is called as a module, so a swapped-in head (e.g. :mod:`vlmkit.quantize`'s
        int8 one) runs its own kernel; a tied one runs :func:`~vlmkit.decode_layout.linear_rows`
        (``torch.mv`` for one row when the decode layout stored the table transposed)."""
        if self.lm_head is None:
            return linear_rows(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def native_decode(self, scheme: str) -> bool:
        """Whether one-token steps with ``scheme``'s layers (``fp32``, ``w8``, ``w4``; not
        ``w8a8``) run as one native call (:mod:`vlmkit.components.llama_fused`) on this machine."""
        return scheme in NATIVE_SCHEMES and self.params.hidden_act == "silu" and native.available()

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"layers={p.num_hidden_layers}, hidden={p.hidden_size}, heads={p.num_attention_heads}, "
            f"kv_heads={p.num_key_value_heads}, head_dim={p.head_dim}, tied={p.tie_word_embeddings}"
        )


@hookimpl
def vlmkit_register_components(registry: Any) -> None:
    """Register :class:`LlamaBackbone` as the ``llama`` backbone."""
    registry.add_backbone("llama", LlamaBackbone)
