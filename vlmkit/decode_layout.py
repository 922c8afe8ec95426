"""Decode-friendly weight layouts for one-row matrix-vector products on the CPU.

A decode step multiplies one row ``x`` ``(1, in)`` by every weight ``W`` ``(out, in)``. On some
CPUs MKL's one-row ``sgemm`` on the row-major ``W`` streams the weights at about half the memory
bandwidth (measured: the 49280 x 576 LM head of SmolLM2-135M on an AMD EPYC). Two faster paths
exist: ``torch.mv`` on a weight whose *storage* is ``W^T`` ``(in, out)`` (a column-major ``W``),
and vlmkit's own kernel on the row-major ``W`` (:func:`vlmkit.native.gemv_f32`, compiled on first
use; where it is unavailable a row-major one-row call runs ``F.linear``). :func:`prepare_decode`
keeps the row-major layout where vlmkit's native kernels are available (they, and the one-call
decode step that reads every layer's weights itself, are written for it: on every AMD EPYC bench
run the timed choice below picked ``rows`` for every shape, and timing it cost the first
``generate`` 0.7 s and up to 256 MB of transposed copies); without them it picks, per weight
shape, the faster of the two layouts (timed on the model's own weights, A/B alternated) and
re-stores the chosen weights:

* the transposed layout **replaces** the weight (``weight`` stays an ``(out, in)`` parameter,
  now a view of ``(in, out)`` storage), so memory does not grow; values are bit-identical, only the summation
  order of the products changes (float32 logits move by ~1e-6);
* every :class:`torch.nn.Linear` of the backbone becomes a :class:`GemvLinear` (a subclass: its
  state dict, ``isinstance`` checks and training are unchanged); a one-row input runs
  :func:`linear_rows` (``torch.mv`` or vlmkit's kernel), several rows (prompts, batched decode) the usual ``F.linear``;
* a tied LM head (``lm_head is None``) re-stores ``embed_tokens.weight`` the same way; the token
  lookup reads its rows through the view (a strided gather, a few KB per token).

It runs once per backbone (:func:`ensure_decode_layout`, called by vlmkit's decode loop) on
float32 CPU weights only; other devices/dtypes are left alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .errors import VlmkitError

__all__ = ["GemvLinear", "LAYOUTS", "linear_rows", "prepare_decode", "ensure_decode_layout", "is_transposed"]

#: ``auto`` (row-major where vlmkit's native kernels run, else time both per shape), ``transposed``
#: (always ``W^T`` storage), ``rows`` (leave row-major).
LAYOUTS = ("auto", "transposed", "rows")
#: A/B rounds per shape for ``auto``; the LM head (the largest matrix) gets fewer.
TUNE_ROUNDS = 5
#: bytes of weights timed per round at most (enough to leave the caches, bounded time).
TUNE_BYTES = 256 << 20


def is_transposed(weight: torch.Tensor) -> bool:
    """Whether an ``(out, in)`` weight is stored as ``(in, out)`` rows (column-major)."""
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0]) and weight.shape[0] > 1


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: ``(..., in) -> (..., out)`` for a ``(out, in)`` ``weight``.

    One row (outside autograd) with a row-major float32 CPU weight runs vlmkit's own kernel
    (:func:`vlmkit.native.gemv_f32`) where it is available, and so do 2 to
    :data:`vlmkit.native.MAX_ROWS` rows (:func:`vlmkit.native.gemm_rows`); one row with a column-major weight
    (see :func:`is_transposed`) runs ``torch.mv`` on it; everything else runs
    :func:`torch.nn.functional.linear`."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows == 1 and is_transposed(weight):
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y.add_(bias) if not y.requires_grad else y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    if rows <= native.MAX_ROWS and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # one row, or a few (a batched decode step): each weight row read once, for all rows
        y = native.gemv_f32(x, weight, bias) if rows == 1 else native.gemm_rows(x, weight, bias)
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class GemvLinear(nn.Linear):
    """An :class:`torch.nn.Linear` whose one-row calls run :func:`linear_rows` (``(..., in) ->
    (..., out)``); built by :meth:`from_linear`, sharing the original's parameters."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GemvLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_rows(x, self.weight, self.bias)


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """The same ``(out, in)`` values, stored ``(in, out)``."""
    return weight.detach().t().contiguous().t()


def _median_time(fn, rounds: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def faster_transposed(weights: list[torch.Tensor], rounds: int = TUNE_ROUNDS) -> bool:
    """Time one-row products over ``weights`` (``(out, in)``, one shape) row-major vs transposed,
    A/B alternated; True when the transposed layout's median is lower."""
    budget = max(1, TUNE_BYTES // max(1, weights[0].numel() * weights[0].element_size()))
    rows = [w.detach() for w in weights[:budget]]
    cols = [_transposed(w) for w in rows]
    x = torch.randn(1, rows[0].shape[1], dtype=rows[0].dtype)
    a, b = [], []
    with torch.inference_mode():
        for w in rows[:1] + cols[:1]:
            linear_rows(x, w)  # warm-up
        for _ in range(rounds):
            a.append(_median_time(lambda: [linear_rows(x, w) for w in rows], 1))
            b.append(_median_time(lambda: [linear_rows(x, w) for w in cols], 1))
    return statistics.median(b) < statistics.median(a)


def _linears(module: nn.Module, prefix: str = "") -> Iterable[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every plain ``nn.Linear`` below ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and type(child).forward in (nn.Linear.forward, GemvLinear.forward):
            yield module, name, child
        else:
            yield from _linears(child, prefix + name + ".")


def _eligible(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def prepare_decode(backbone: nn.Module, layout: str = "auto") -> dict[tuple[int, int], str]:
    """Give ``backbone``'s float32 CPU linear layers (and a tied head's embedding) their decode
    layout, in place; returns ``{(out, in): "transposed" | "rows"}`` per weight shape.

    ``layout``: one of :data:`LAYOUTS`. Raises :class:`VlmkitError` for another value."""
    if layout not in LAYOUTS:
        raise VlmkitError(f"decode layout {layout!r} is not known", hint=f"choose one of {', '.join(LAYOUTS)}")
    targets: list[tuple[nn.Module, str]] = []  # (module owning 'weight', attr); no weight held here
    for parent, name, linear in list(_linears(backbone)):
        if _eligible(linear.weight):
            gemv = linear if isinstance(linear, GemvLinear) else GemvLinear.from_linear(linear)
            setattr(parent, name, gemv)
            targets.append((gemv, "weight"))
    targets += _tied_embeddings(backbone, {id(owner.weight) for owner, _ in targets})
    shapes: dict[tuple[int, int], list[tuple[nn.Module, str]]] = {}
    for owner, attr in targets:
        shapes.setdefault(tuple(getattr(owner, attr).shape), []).append((owner, attr))
    chosen = {}
    with torch.no_grad():
        _apply_layouts(shapes, layout, chosen)
    backbone.decode_layout = chosen
    return chosen


def _tied_embeddings(backbone: nn.Module, linear_weights: set[int]) -> list[tuple[nn.Module, str]]:
    """Embedding tables that share a linear's weight (a tied LM head), or that serve as the head
    (``lm_head is None``): re-stored with it, so the tie (and the memory) stays one tensor."""
    found = []
    headless = getattr(backbone, "lm_head", 0) is None
    for module in backbone.modules():
        if isinstance(module, nn.Embedding) and _eligible(module.weight):
            if id(module.weight) in linear_weights or (headless and module is getattr(backbone, "embed_tokens", None)):
                found.append((module, "weight"))
    return found


def _apply_layouts(shapes: dict, layout: str, chosen: dict) -> None:  # noqa: ANN001
    """Choose and store the layout of each shape group (see :func:`prepare_decode`).

    Each old weight is replaced in every owner that shares it at once and then dropped, so at most
    one weight exists twice at a time (peak memory grows by one weight, not by the model)."""
    for shape, group in shapes.items():
        rounds = TUNE_ROUNDS if len(group) > 1 else 3
        transpose = layout == "transposed" or (
            layout == "auto" and not native.available() and faster_transposed([getattr(o, a) for o, a in group], rounds)
        )
        chosen[shape] = "transposed" if transpose else "rows"
        for i, (owner, attr) in enumerate(group):
            old = getattr(owner, attr)
            if transpose == is_transposed(old):
                continue  # already in this layout (or renewed through an earlier owner that shares it)
            new = nn.Parameter(_transposed(old) if transpose else old.detach().contiguous(), requires_grad=old.requires_grad)
            for other, other_attr in group[i:]:
                if getattr(other, other_attr) is old:
                    setattr(other, other_attr, new)
            del old


def ensure_decode_layout(backbone: nn.Module) -> None:
    """:func:`prepare_decode` once per backbone (``layout="auto"``): a no-op when done before, or
    when the backbone has no float32 CPU weights (e.g. a GPU or bfloat16 model)."""
    if getattr(backbone, "decode_layout", None) is not None or not isinstance(backbone, nn.Module):
        return
    first = next(backbone.parameters(), None)
    if first is None or not _eligible_any(backbone):
        backbone.decode_layout = {}
        return
    prepare_decode(backbone)


def _eligible_any(backbone: nn.Module) -> bool:
    return any(_eligible(linear.weight) for _, _, linear in _linears(backbone))
