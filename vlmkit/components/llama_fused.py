"""The Llama decode step in one native call (``vlmkit/native/llama_step.c``).

A decode step of :class:`~vlmkit.components.llama.LlamaBackbone` (one new token per row)
runs ~25 small torch ops per layer around its four matrix-vector products; on a 30-layer model
that per-op overhead costs as much as reading the weights. :class:`FusedDecode` runs every layer
(RMSNorm, qkv, RoPE, the KV-cache write, attention, o_proj, residual, RMSNorm, gate/up, SiLU,
down, residual) in one call of vlmkit's native kernels, with the same weights in place:

* float32 weights row-major (vlmkit's one-row kernel) or stored transposed (the decode layout),
  and the weight-only ``w8`` / ``w4`` copies of :class:`~vlmkit.weight_only.WeightOnlyLinear`;
* the KV cache is the backbone's own :class:`~vlmkit.kv_cache.KVCache` (written in place), the
  RoPE cos/sin the backbone's table; the final norm and the LM head stay in torch;
* ``B`` unpadded rows at once (batched decode): each block of weight rows is read (and
  dequantized) once for all rows; a padded batch (a mask) runs the modules.

:meth:`FusedDecode.build` says why a backbone cannot use it (any other layer type, e.g. W8A8's
``Int8Linear`` or a LoRA wrapper; a hook on a module; an activation other than SiLU; not float32
on the CPU; vlmkit's kernels not compiled) and the backbone then runs its modules. The plan is
checked against the modules (a swapped layer or weight, or a new hook, makes it rebuild) at the
first step of every run of consecutive steps: a new cache, or a step after a prefill or a reset of
the same cache. Steps that continue the previous one (one ``generate`` call's decode loop) skip
the check, which reads ~1,100 module dicts (~300 us a token in the decode loop, where the weights
just streamed have pushed those dicts out of the caches: 6% of a ``w8`` token): a module swapped
between two steps of one generation is not seen. It only runs outside autograd. Shapes: ``h`` ``(D,)``; cache ``(layers, 1, H_kv,
capacity, d)``.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from typing import Any

import torch
from torch import nn

from .. import native
from ..decode_layout import GemvLinear, is_transposed
from ..kv_cache import KVCache
from ..weight_only import WeightOnlyLinear
from .llama_layers import RMSNorm

__all__ = ["FusedDecode", "NATIVE_SCHEMES", "fused_step", "plan_of"]

#: the layer schemes the native step runs (W8A8's dynamic int8 layers are not among them)
NATIVE_SCHEMES = ("fp32", "w8", "w4")

log = logging.getLogger(__name__)
#: backbone -> (the KV cache the plan was made for, the plan or why there is none)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_F = ctypes.POINTER(ctypes.c_float)


class _Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("out", ctypes.c_int), ("inp", ctypes.c_int), ("group", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("lo", ctypes.c_void_p), ("bias", ctypes.c_void_p)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p)]  # fmt: skip


class _Dims(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("act", ctypes.c_int), ("eps", ctypes.c_float)]  # fmt: skip


def _f32(t: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape)


def _matrix(linear: nn.Module) -> tuple[_Mat, list[torch.Tensor]] | str:
    """The C description of ``linear`` and the tensors it points into, or why it cannot be run."""
    if not isinstance(linear, nn.Linear) or not isinstance(linear.weight, torch.Tensor):
        return f"{type(linear).__name__} is not a linear layer vlmkit's kernels run"
    out, inp, w, bias = linear.out_features, linear.in_features, linear.weight, linear.bias
    if not _f32(bias, (out,)):
        return "its bias is not a float32 CPU tensor"
    mat = _Mat(out=out, inp=inp, bias=bias.data_ptr() if bias is not None else None)
    if isinstance(linear, WeightOnlyLinear):
        q = linear.quantized
        if linear.scheme == "w8":
            mat.kind, mat.group, keep = 2, linear.group, [q["q8"], q["scale"]]
            mat.w, mat.scale = q["q8"].data_ptr(), q["scale"].data_ptr()
        else:
            mat.kind, mat.group, keep = 3, linear.group, [q["q4"], q["scale"], q["lo"]]
            mat.w, mat.scale, mat.lo = q["q4"].data_ptr(), q["scale"].data_ptr(), q["lo"].data_ptr()
        return mat, [*keep, *([bias] if bias is not None else [])]
    if type(linear) not in (nn.Linear, GemvLinear):
        return f"{type(linear).__name__} has its own forward"
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.shape != (out, inp):
        return "its weight is not a float32 CPU matrix"
    if w.is_contiguous():
        mat.kind = 0
    elif is_transposed(w):
        mat.kind = 1
    else:
        return "its weight is neither row-major nor stored transposed"
    mat.w = w.data_ptr()
    return mat, [w, *([bias] if bias is not None else [])]


_MISSING = object()


def _table(owner: nn.Module, attr: str) -> dict:
    """The dict of ``owner`` that holds ``attr`` (its submodules, parameters, buffers or plain
    attributes), so a check is one dict lookup instead of ``Module.__getattr__``."""
    for table in (owner._modules, owner._parameters, owner._buffers):
        if attr in table:
            return table
    return owner.__dict__


class FusedDecode:
    """A built plan: the C layer table for one backbone's current modules (see module docstring)."""

    def __init__(self, backbone: nn.Module, lib: ctypes.CDLL, layers: Any, keep: list, refs: list) -> None:
        self.lib, self.layers, self.keep, self.refs = lib, layers, keep, refs
        self.hooked = [m for _, _, m in refs if isinstance(m, nn.Module)]
        self.slots = [(_table(owner, attr), attr, obj) for owner, attr, obj in refs]
        self.transposed = any(getattr(layers[i], part).kind == 1 for i in range(len(layers)) for part in ("qkv", "o", "gate_up", "down"))
        p = backbone.params
        self.dims = _Dims(layers=p.num_hidden_layers, hidden=p.hidden_size, heads=p.num_attention_heads,
                          kv_heads=p.num_key_value_heads, head_dim=p.head_dim, inter=p.intermediate_size,
                          act=0, eps=float(p.rms_norm_eps))  # fmt: skip

    @classmethod
    def build(cls, backbone: nn.Module) -> FusedDecode | str:
        """The plan for ``backbone`` (a :class:`~vlmkit.components.llama.LlamaBackbone`), or why none."""
        lib = native.library()
        if lib is None:
            return f"vlmkit's native kernels are not available ({native.status()})"
        p = backbone.params
        if p.hidden_act != "silu":
            return f"hidden_act={p.hidden_act!r} (the native step implements silu)"
        table = (_Layer * len(backbone.layers))()
        keep: list[torch.Tensor] = []
        refs: list[tuple[Any, str, Any]] = [(backbone, "layers", backbone.layers)]
        for i, layer in enumerate(backbone.layers):
            why = cls._fill(table[i], layer, p, keep, refs)
            if why:
                return f"layer {i}: {why}"
            refs.append((backbone.layers, str(i), layer))
        plan = cls(backbone, lib, table, keep, refs)
        hooked = plan.hooked_module()
        return plan if hooked is None else f"a forward hook on {type(hooked).__name__} (the native step would skip it)"

    @staticmethod
    def _fill(entry: _Layer, layer: nn.Module, p: Any, keep: list, refs: list) -> str | None:
        attn, mlp = layer.self_attn, layer.mlp
        refs += [(layer, "self_attn", attn), (layer, "mlp", mlp)]
        parts = {"qkv": (attn, "qkv_proj"), "o": (attn, "o_proj"), "gate_up": (mlp, "gate_up_proj"), "down": (mlp, "down_proj")}
        for name, (owner, attr) in parts.items():
            linear = getattr(owner, attr)
            got = _matrix(linear)
            if isinstance(got, str):
                return f"{name}_proj: {got}"
            setattr(entry, name, got[0])
            keep += got[1]
            refs += [(owner, attr, linear), (linear, "weight", linear.weight), (linear, "bias", linear.bias)]
        for field, attr in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
            norm = getattr(layer, attr)
            if type(norm) is not RMSNorm or not _f32(norm.weight, (p.hidden_size,)) or norm.eps != p.rms_norm_eps:
                return f"{attr}: not a float32 RMSNorm with eps {p.rms_norm_eps}"
            setattr(entry, field, norm.weight.data_ptr())
            keep.append(norm.weight)
            refs += [(layer, attr, norm), (norm, "weight", norm.weight)]
        return None

    def current(self) -> bool:
        """Whether the modules are still the ones planned (same modules and weights) and none
        has a forward hook (which the native step would skip). Runs before every step, so it
        reads the modules' own dicts (a few dict lookups per module, ~50 us for 30 layers)."""
        for table, attr, obj in self.slots:
            if table.get(attr, _MISSING) is not obj:
                return False
        return self.hooked_module() is None

    def hooked_module(self) -> nn.Module | None:
        """The first planned module with a forward (pre-)hook, or None."""
        return next((m for m in self.hooked if m._forward_hooks or m._forward_pre_hooks), None)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any) -> torch.Tensor | None:
        """``h`` ``(B, 1, D)`` -> ``(B, 1, D)`` after every layer, every row at position
        ``cache.length`` (no padding); writes the cache there (the caller checked room and
        advances it). None for ``B > 1`` with a weight stored transposed (the modules run it)."""
        B = h.shape[0]
        if B > 1 and self.transposed:
            return None
        out = h.reshape(B, -1).clone()
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        cap = cache.capacity
        scratch = torch.empty(self.lib.vlmkit_llama_scratch(ctypes.byref(self.dims), cap, B), dtype=torch.float32)
        rc = self.lib.vlmkit_llama_step(ctypes.byref(self.dims), self.layers, out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        cache.keys.data_ptr(), cache.values.data_ptr(), cap, cache.length, B,
                                        scratch.data_ptr(), scratch.numel(), torch.get_num_threads())  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"vlmkit's native decode step failed (code {rc})")
        return out.view(B, 1, -1)


def fused_step(backbone: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any) -> torch.Tensor | None:
    """Every layer of ``backbone`` over one token per row, ``h`` ``(B, 1, D)``, in one native call, or None
    when this backbone cannot run it now (the caller runs its modules). The plan is made once per
    KV cache (a generation) and checked at the first step of each run of consecutive steps."""
    if type(cache) is not KVCache or h.dtype != torch.float32 or cache.dtype != torch.float32 or not cache.keys.is_contiguous():
        return None  # e.g. the server's per-slot caches: the modules
    entry = _PLANS.get(backbone)  # (the cache, the plan, the cache length at which a step continues the last)
    same_cache = entry is not None and entry[0]() is cache
    if not (same_cache and entry[2] == cache.length):  # the first of a run of steps: check the plan
        if not same_cache or (isinstance(entry[1], FusedDecode) and not entry[1].current()):
            plan = FusedDecode.build(backbone)
            if isinstance(plan, str):
                log.debug("native decode step not used: %s", plan)
            entry = (weakref.ref(cache), plan, None)
    plan = entry[1]
    _PLANS[backbone] = (entry[0], plan, cache.length + 1)  # the caller advances the cache by this step
    return plan.step(h, cos, sin, cache) if isinstance(plan, FusedDecode) else None


def plan_of(backbone: nn.Module) -> FusedDecode | str | None:
    """The plan ``backbone``'s last one-token step used, the reason it had none, or None before
    any such step."""
    entry = _PLANS.get(backbone)
    return None if entry is None else entry[1]
