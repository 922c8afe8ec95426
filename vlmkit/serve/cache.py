"""A key/value cache with one row ("slot") per running request, for continuous batching.

:class:`SlotCache` has the interface the ``llama`` backbone calls on a
:class:`vlmkit.kv_cache.KVCache` (``check``/``update``/``advance``/``length``), so the backbone's
public ``forward(inputs_embeds, attention_mask, position_ids, cache)`` decodes every running
request in one pass. The layout:

- storage ``(num_layers, max_batch, H_kv, width, head_dim)``; rows ``[0, rows)`` are the running
  requests, always contiguous (a leaving row is replaced by the last one), so the backbone sees
  plain views ``[:rows]`` and no gather is needed;
- all rows share one fill counter :attr:`length` (``L``): each step writes every row's new token
  at column ``L``. A row's tokens are right-aligned; the columns left of its first token are
  padding, masked out by :attr:`mask` ``(max_batch, width)`` (1 = a real token). Rotary position
  ids are baked into the keys when they are written, so moving a row's columns (to make room, or
  to drop leading padding) does not change what it computes;
- ``width`` grows by doubling up to ``max_width`` (the model's context), so a server holds memory
  for the longest running request, not for the context times the batch.

Shape letters: ``N`` layers, ``S`` slots (``max_batch``), ``H_kv`` key/value heads, ``W`` width,
``d`` head dim, ``B`` running rows, ``T`` new tokens, ``P`` a prompt's length.
"""

from __future__ import annotations

import torch

from ..errors import GenerationError
from ..kv_cache import KVCache

__all__ = ["SlotCache"]

#: First allocated width (columns); doubled as needed up to the context.
INITIAL_WIDTH = 256


class SlotCache:
    """Per-request rows of key/value storage with a shared fill counter; see the module docstring."""

    def __init__(self, like: KVCache, max_batch: int, max_width: int) -> None:
        """Storage shaped like ``like`` (a one-row :class:`KVCache` of the backbone: its layers,
        heads, head dim, dtype and device) for ``max_batch`` rows of up to ``max_width`` columns."""
        self.num_layers, self.num_kv_heads, self.head_dim = like.num_layers, like.num_kv_heads, like.head_dim
        self.dtype, self.device = like.dtype, like.device
        self.max_batch, self.max_width = max_batch, max_width
        self.rows = 0
        self.length = 0
        #: ``(S,)`` the next rotary position of each row: its real tokens so far.
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._allocate(min(INITIAL_WIDTH, max_width))

    def _allocate(self, width: int) -> None:
        shape = (self.num_layers, self.max_batch, self.num_kv_heads, width, self.head_dim)
        old = getattr(self, "keys", None)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        mask = torch.zeros(self.max_batch, width, dtype=torch.long, device=self.device)
        if old is not None and self.length:
            keys[..., : self.length, :] = self.keys[..., : self.length, :]
            values[..., : self.length, :] = self.values[..., : self.length, :]
            mask[:, : self.length] = self.mask[:, : self.length]
        self.keys, self.values, self.mask = keys, values, mask
        self._k, self._v = list(keys.unbind(0)), list(values.unbind(0))

    @property
    def width(self) -> int:
        return self.keys.shape[3]

    # ------------------------------------------------------------------ the KVCache interface
    def check(self, batch_size: int, new_tokens: int) -> None:
        """Raise :class:`~vlmkit.errors.GenerationError` unless ``batch_size`` is the running rows
        and ``new_tokens`` more columns fit (call :meth:`reserve` first)."""
        if batch_size != self.rows:
            raise GenerationError(f"the slot cache runs {self.rows} rows but got a batch of {batch_size}")
        if self.length + new_tokens > self.width:
            raise GenerationError(f"the slot cache is full: {self.length} + {new_tokens} > width {self.width}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, H_kv, T, d)`` keys/values at columns ``[length, length + T)`` of the running
        rows; returns the filled views ``(B, H_kv, length + T, d)``."""
        end = self.length + k.shape[2]
        kc, vc = self._k[layer], self._v[layer]
        kc[: self.rows, :, self.length : end].copy_(k)
        vc[: self.rows, :, self.length : end].copy_(v)
        return kc[: self.rows, :, :end], vc[: self.rows, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more columns as filled (real tokens for every running row)."""
        self.mask[: self.rows, self.length : self.length + n] = 1
        self.positions[: self.rows] += n
        self.length += n

    # ------------------------------------------------------------------ rows
    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(B, length + 1)`` attention mask and ``(B, 1)`` position ids of the next one-token
        step (call :meth:`reserve` first to make room for it)."""
        self.mask[: self.rows, self.length] = 1
        return self.mask[: self.rows, : self.length + 1], self.positions[: self.rows, None]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns after :attr:`length`: drop the padding every row
        has on the left, then grow the storage. Raises when even that cannot fit them."""
        if self.length + columns <= self.width:
            return
        self.compact()
        self._ensure_width(self.length + columns)

    def _ensure_width(self, need: int) -> None:
        if need <= self.width:
            return
        if need > self.max_width:
            raise GenerationError(f"the slot cache cannot hold {need} columns (max {self.max_width})")
        width = self.width
        while width < need:
            width *= 2
        self._allocate(min(width, self.max_width))

    def compact(self) -> None:
        """Shift every row left by the padding they all share (nothing when a row is full)."""
        if self.rows == 0:
            self.length = 0
            return
        real = self.mask[: self.rows, : self.length].any(dim=0)
        shift = int(real.float().argmax()) if bool(real.any()) else self.length
        if shift:
            self._move_columns(shift, self.length, 0)
            self.length -= shift

    def add(self, row_cache: KVCache) -> int:
        """Append one request's prefilled ``KVCache`` (one row, ``P`` filled) as a new row;
        returns its index. The row's tokens end at column :attr:`length` (grown to ``P`` if needed)."""
        if self.rows >= self.max_batch:
            raise GenerationError(f"all {self.max_batch} slots are in use")
        P = row_cache.length
        self.compact()
        if P > self.length:  # shift the running rows right: the new one is longer than all of them
            self._ensure_width(P + 1)
            self._move_columns(0, self.length, P - self.length)
            self.mask[: self.rows, : P - self.length] = 0
            self.length = P
        else:
            self._ensure_width(self.length + 1)
        row, start = self.rows, self.length - P
        self.keys[:, row, :, start : self.length] = row_cache.keys[:, 0, :, :P]
        self.values[:, row, :, start : self.length] = row_cache.values[:, 0, :, :P]
        self.mask[row, :start] = 0
        self.mask[row, start : self.length] = 1
        self.positions[row] = P
        self.rows += 1
        return row

    def remove(self, row: int) -> int | None:
        """Free ``row``; the last row moves into its place. Returns the index that moved (or None)."""
        last = self.rows - 1
        moved = None
        if row != last:
            L = self.length
            self.keys[:, row, :, :L] = self.keys[:, last, :, :L]
            self.values[:, row, :, :L] = self.values[:, last, :, :L]
            self.mask[row, :L] = self.mask[last, :L]
            self.positions[row] = self.positions[last]
            moved = last
        self.mask[last] = 0
        self.rows = last
        if self.rows == 0:
            self.length = 0
        return moved

    def _move_columns(self, start: int, end: int, to: int) -> None:
        """Copy the running rows' columns ``[start, end)`` to ``[to, to + end - start)`` (may overlap)."""
        n = end - start
        if n <= 0 or start == to:
            return
        for store in (self.keys, self.values):
            store[:, : self.rows, :, to : to + n] = store[:, : self.rows, :, start:end].clone()
        self.mask[: self.rows, to : to + n] = self.mask[: self.rows, start:end].clone()

    def __repr__(self) -> str:
        return f"SlotCache(rows={self.rows}/{self.max_batch}, length={self.length}, width={self.width}/{self.max_width})"
