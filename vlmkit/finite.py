"""NaN/inf checks of a model's weights (``build(..., check_finite=True)``, ``vlmkit inspect --check``)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import WeightLoadError

__all__ = ["nonfinite_tensors", "check_finite"]

#: Elements checked at a time (bounds the temporary boolean mask to 16 MB).
_CHUNK = 16 * 1024 * 1024


def nonfinite_tensors(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, NaN count, inf count)`` of every floating parameter or buffer holding a NaN or an
    infinity, in ``named_parameters`` then ``named_buffers`` order (meta tensors are skipped)."""
    found = []
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta or not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        flat = t.detach().reshape(-1)
        nan = inf = 0
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK]
            nan += int(torch.isnan(part).sum())
            inf += int(torch.isinf(part).sum())
        if nan or inf:
            found.append((name, nan, inf))
    return found


def check_finite(model: nn.Module, source: str | None = None) -> None:
    """Raise :class:`WeightLoadError` naming every tensor of ``model`` with NaN/inf values."""
    bad = nonfinite_tensors(model)
    if not bad:
        return
    lines = "\n".join(f"  {name}: {nan:,} NaN, {inf:,} inf" for name, nan, inf in bad[:12])
    more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise WeightLoadError(
        f"{len(bad)} tensor(s) {'of ' + source + ' ' if source else ''}hold NaN or infinite values:\n{lines}{more}",
        hint="the checkpoint is corrupt or was saved after a diverged training step; use another copy or an earlier checkpoint",
    )
