"""Building blocks of the Llama backbone (:mod:`vlmkit.components.llama`).

RMSNorm, the ``hidden_act`` table, RoPE (``rope_scaling`` checks, inverse frequencies, cos/sin),
the SDPA mask builder, grouped-query attention, the SwiGLU MLP and the pre-norm decoder layer. :class:`LlamaBackbone
<vlmkit.components.llama.LlamaBackbone>` stacks them; see that module's docstring for the
architecture and the speed choices. This module is not a plugin (it registers nothing); its
public names are re-exported from :mod:`vlmkit.components.llama`.

Shape letters: ``B`` batch, ``T`` new tokens, ``L`` attended length (past + T), ``D`` hidden
size, ``H`` query heads, ``H_kv`` key/value heads, ``d`` head dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenerationError
from ..kv_cache import KVCache
from .activations import ACTIVATIONS

if TYPE_CHECKING:
    from .llama import Params

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_ROPE_TYPES",
    "RMSNorm",
    "rope_inv_freq",
    "sdpa_mask",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
]

#: ``rope_scaling["rope_type"]`` values this backbone implements, with their required keys.
SUPPORTED_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

HAS_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ============================================================================== rope_scaling
def _pop_rope_type(scaling: dict[str, Any]) -> str:
    """Remove ``rope_type`` (or the legacy ``type``) from ``scaling`` and return it, checked."""
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
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
    return rope_type


def normalize_rope_scaling(raw: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    """A checked copy of ``raw`` as :class:`~vlmkit.components.llama.Params` stores it (``None`` for ``default``)."""
    scaling = dict(raw)
    rope_type = _pop_rope_type(scaling)
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


# ============================================================================== norm, rope
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


def rope_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(..., d/2)`` angles -> ``cos``, signed ``sin`` ``(..., d)`` in ``dtype``.

    The signed sine is ``[-sin, sin]`` so that ``rotate_half(x) * sin == roll(x, d/2) * signed_sin``.
    """
    cos = freqs.cos()
    sin = freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


# ============================================================================== attention
def sdpa_mask(
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
            if self.n_rep > 1 and not HAS_SDPA_GQA:
                k = k.repeat_interleave(self.n_rep, dim=1)
                v = v.repeat_interleave(self.n_rep, dim=1)
                gqa = {}
            else:
                gqa = {"enable_gqa": True} if self.n_rep > 1 else {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
            out = out.transpose(1, 2).reshape(B, T, self.q_out)
        return self.o_proj(out)


# ============================================================================== mlp, layer
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

