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

Shape letters: ``B`` batch, ``T`` new tokens, ``L`` attended length (past + T), ``D`` hidden
size, ``V`` vocabulary, ``H`` query heads, ``H_kv`` key/value heads, ``d`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import nn

from ..errors import GenerationError
from ..errors import divisors as _divisors
from ..hookspecs import hookimpl
from ..keymap import KeyMap, KeyRule
from ..kv_cache import KVCache

__all__ = ["Params", "LlamaBackbone", "KVCache", "SUPPORTED_ROPE_TYPES", "ACTIVATIONS", "vlmkit_register_components"]

#: ``hidden_act`` values this backbone implements (transformers' ``ACT2FN`` names).
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

#: ``rope_scaling["rope_type"]`` values this backbone implements, with their required keys.
SUPPORTED_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

_HAS_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


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
            divisors = _divisors(heads)
            raise ValueError(
                f"num_key_value_heads={kv} must divide num_attention_heads={heads} (each key/value head "
                f"serves a whole group of query heads); expected one of {divisors}"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary; expected 0 <= id < "
                f"vocab_size={self.vocab_size} or None"
            )
        return self


def _normalize_rope_scaling(raw: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    scaling = dict(raw)
    rope_type = scaling.pop("rope_type", None)
    legacy = scaling.pop("type", None)
    if rope_type is None:
        rope_type = legacy
    elif legacy is not None and legacy != rope_type:
        raise ValueError(f"rope_scaling has rope_type={rope_type!r} and type={legacy!r}; give one")
    if rope_type is None:
        raise ValueError(f"rope_scaling needs a 'rope_type' key; supported types: {supported}")
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; supported types: {supported}")
    needed = SUPPORTED_ROPE_TYPES[rope_type]
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    unknown = sorted(set(scaling) - set(needed))
    if unknown:
        raise ValueError(
            f"rope_scaling for rope_type={rope_type!r} has unsupported keys {unknown}; "
            f"expected only {list(needed) or 'no other keys'}"
        )
    missing = [k for k in needed if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling for rope_type={rope_type!r} is missing {missing}")
    if rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in needed:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"rope_scaling.{key}={value!r} must be a positive number")
        out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    if rope_type == "linear" and out["factor"] < 1.0:
        raise ValueError(f"rope_scaling.factor={out['factor']} must be >= 1 for linear scaling")
    if rope_type == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(
            f"rope_scaling.high_freq_factor={out['high_freq_factor']} must be greater than "
            f"low_freq_factor={out['low_freq_factor']}"
        )
    return out


# ============================================================================== pieces
class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, normalised in fp32 (transformers' rounding order)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self._shape = (size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., D)``."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self._shape, self.weight, self.eps)
        # Low precision: normalise in fp32, cast, then scale in the input dtype like transformers.
        return self.weight * F.rms_norm(x.float(), self._shape, None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self._shape[0]}, eps={self.eps}"


def rope_inv_freq(params: Params, device: torch.device | None = None) -> torch.Tensor:
    """The ``(head_dim // 2,)`` fp32 inverse frequencies, with ``rope_scaling`` applied."""
    dim = params.head_dim
    inv_freq = 1.0 / (
        params.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    scaling = params.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(..., d/2)`` angles -> ``cos``, signed ``sin`` ``(..., d)`` in ``dtype``.

    The signed sine is ``[-sin, sin]`` so that ``rotate_half(x) * sin == roll(x, d/2) * signed_sin``.
    """
    cos = freqs.cos()
    sin = freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE, a fused ``qkv_proj`` and an optional KV cache."""

    def __init__(self, params: Params, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = params.num_attention_heads
        self.num_kv_heads = params.num_key_value_heads
        self.head_dim = params.head_dim
        self.n_rep = self.num_heads // self.num_kv_heads
        self.q_out = self.num_heads * self.head_dim
        self.kv_out = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(params.hidden_size, self.q_out + 2 * self.kv_out, bias=params.attention_bias)
        self.o_proj = nn.Linear(self.q_out, params.hidden_size, bias=params.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """``(B, T, D)``, cos/sin ``(B|1, T, 1, d)``, bool mask ``(B|1, 1, T, L)`` or None -> ``(B, T, D)``."""
        B, T, _ = x.shape
        H, H_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, d)
        qk = qkv[:, :, : H + H_kv]
        # RoPE on q and k heads at once: x*cos + rotate_half(x)*sin, rotate_half via roll + signed sin.
        # Two rounded products then a sum, as transformers does: a fused multiply-add (addcmul)
        # rounds differently and drifts ~1e-4 in the logits over 30 layers of real weights.
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, d)
        k = qk[:, :, H:].transpose(1, 2)  # (B, H_kv, T, d)
        v = qkv[:, :, H + H_kv :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, L, d) views of the cache
        if T == 1 and self.n_rep > 1:
            # Decode step: fold each group's query heads into the query axis; no repeated K/V.
            out = F.scaled_dot_product_attention(q.reshape(B, H_kv, self.n_rep, d), k, v, attn_mask=mask)
            out = out.reshape(B, 1, self.q_out)
        else:
            if self.n_rep > 1 and not _HAS_SDPA_GQA:
                k = k.repeat_interleave(self.n_rep, dim=1)
                v = v.repeat_interleave(self.n_rep, dim=1)
                gqa = {}
            else:
                gqa = {"enable_gqa": True} if self.n_rep > 1 else {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
            out = out.transpose(1, 2).reshape(B, T, self.q_out)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))`` with gate and up fused into ``gate_up_proj``."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.intermediate_size = params.intermediate_size
        self.gate_up_proj = nn.Linear(params.hidden_size, 2 * params.intermediate_size, bias=params.mlp_bias)
        self.down_proj = nn.Linear(params.intermediate_size, params.hidden_size, bias=params.mlp_bias)
        self.act = ACTIVATIONS[params.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, params: Params, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(params, layer_idx)
        self.mlp = LlamaMLP(params)
        self.input_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):  # noqa: ANN001 - see LlamaAttention.forward
        """``(B, T, D) -> (B, T, D)``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ============================================================================== backbone
class LlamaBackbone(nn.Module):
    """A Llama decoder on embeddings (the ``backbone`` slot); see the module docstring.

    Built as ``LlamaBackbone(params)`` (a :class:`Params` or a mapping of its fields).

    State dict keys (local names): ``embed_tokens.weight``, ``layers.{i}.self_attn.qkv_proj.weight``
    (q, k, v rows stacked; ``.bias`` with ``attention_bias``), ``layers.{i}.self_attn.o_proj.weight``,
    ``layers.{i}.mlp.gate_up_proj.weight`` (gate, up rows stacked), ``layers.{i}.mlp.down_proj.weight``,
    ``layers.{i}.input_layernorm.weight``, ``layers.{i}.post_attention_layernorm.weight``,
    ``norm.weight`` and, unless ``tie_word_embeddings``, ``lm_head.weight``.

    Checkpoint layout: :attr:`checkpoint_prefix` + transformers' ``LlamaModel`` names, and
    :attr:`head_key` for the LM head. The defaults fit an Idefics3/SmolVLM checkpoint; a subclass
    may override both, or call :meth:`key_map_for` (e.g. ``key_map_for("model.")`` for a plain
    ``LlamaForCausalLM`` checkpoint).
    """

    Params: ClassVar[type[Params]] = Params

    #: Prefix of the embedding, layers and final norm in the checkpoint.
    checkpoint_prefix: ClassVar[str] = "model.text_model."
    #: Checkpoint key of the (untied) LM head.
    head_key: ClassVar[str] = "lm_head.weight"
    #: The layout of a plain transformers ``LlamaForCausalLM`` checkpoint (for :meth:`key_map_for`).
    CAUSAL_LM_PREFIX: ClassVar[str] = "model."

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
        """Local keys <- checkpoint keys in this class's layout (:attr:`checkpoint_prefix`, :attr:`head_key`)."""
        return self.key_map_for(self.checkpoint_prefix, self.head_key)

    def key_map_for(self, prefix: str = CAUSAL_LM_PREFIX, head_key: str = "lm_head.weight") -> KeyMap:
        """The key map for a checkpoint that stores ``LlamaModel`` weights under ``prefix``.

        ``q_proj``/``k_proj``/``v_proj`` fuse into ``qkv_proj`` (rows ``(H*d, H_kv*d, H_kv*d)``) and
        ``gate_proj``/``up_proj`` into ``gate_up_proj`` (rows ``(I, I)``). With tied embeddings
        there is no head rule (the head reuses ``embed_tokens.weight``).
        """
        p = self.params
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
            cos, sin = _cos_sin(freqs, dtype)
            if cos.dim() == 2:
                cos, sin = cos[None], sin[None]
            return cos[:, :, None, :], sin[:, :, None, :]
        end = start + length
        key = (device, dtype)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < end:
            size = max(end, 256, 2 * table[0].shape[0] if table is not None else 0)
            pos = torch.arange(size, device=device, dtype=torch.int64).float()
            table = self._rope_tables[key] = _cos_sin(torch.outer(pos, self._inv_freq_on(device)), dtype)
        return table[0][None, start:end, None, :], table[1][None, start:end, None, :]

    # ------------------------------------------------------------------------- mask
    @staticmethod
    def _mask(
        attention_mask: torch.Tensor | None, batch: int, T: int, past: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """``(bool mask (B|1, 1, T, L) or None, is_causal)`` for SDPA; True = may attend."""
        L = past + T
        if attention_mask is not None:
            if attention_mask.shape != (batch, L):
                raise GenerationError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new) = "
                    f"({batch}, {past} + {T})"
                )
            # A host sync, so only where it is cheap: on CPU, or once per prompt (T > 1).
            if (T > 1 or attention_mask.device.type == "cpu") and bool(attention_mask.all()):
                attention_mask = None
        if attention_mask is None:
            if T == 1:
                return None, False
            if past == 0:
                return None, True
            q = torch.arange(past, L, device=device)
            return (torch.arange(L, device=device)[None, :] <= q[:, None])[None, None], False
        valid = attention_mask[:, None, None, :] != 0  # (B, 1, 1, L)
        if T == 1:
            valid[..., -1] = True  # a query always sees itself: a padded row stays finite
            return valid, False
        q = torch.arange(past, L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        # Causal and not padding; plus the diagonal so fully padded query rows never give NaN.
        return ((k <= q) & valid) | (k == q), False

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
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, V)``; the tied head reuses ``embed_tokens.weight``.

        An untied head is called as a module, so a swapped-in head (e.g. :mod:`vlmkit.quantize`'s
        int8 one) runs its own kernel."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def generate_from_embeds(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **gen: Any
    ) -> torch.Tensor:
        """New tokens ``(B, T_new)`` decoded from prompt embeddings with a preallocated KV cache;
        ``gen`` as :func:`vlmkit.generation.generate_from_embeds` (the generic loop)."""
        from ..generation import generate_from_embeds

        return generate_from_embeds(self, inputs_embeds, attention_mask, **gen)

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
