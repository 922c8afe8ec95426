"""A key/value cache for incremental decoding that grows on demand.

One :class:`KVCache` holds every layer's keys and values in two tensors of shape
``(num_layers, B, H_kv, capacity, head_dim)``. A forward pass over ``T`` new tokens copies their
keys/values into the slots ``[length, length + T)`` of each layer (no ``torch.cat`` per step) and
then advances :attr:`KVCache.length` by ``T``.

Memory follows use, not the promise: ``max_length`` is the most the cache may ever hold (the
prompt plus ``max_new_tokens``), but storage is only allocated for what has been written plus a
small headroom (:data:`GROW_STEP` positions), and grows by half its size when full (one copy, so
the cost per token stays constant). A generate asked for 100,000 tokens that stops after one holds
what a generate asked for one token holds.

Shape letters: ``B`` batch, ``H_kv`` key/value heads, ``T`` new tokens, ``L`` filled length
(``length + T`` during a forward pass).
"""

from __future__ import annotations

import torch

from .errors import GenerationError

__all__ = ["KVCache", "GROW_STEP"]

#: Positions of headroom allocated beyond what a forward pass needs (and the least a growth adds).
GROW_STEP = 256


class KVCache:
    """Per-layer key/value storage with a fill counter, grown on demand up to ``max_length``.

    Attributes:
        keys, values: ``(num_layers, B, H_kv, capacity, head_dim)`` storage (``capacity`` is 0
            until the first forward pass; then at least the filled length).
        length: how many positions are filled (the same for every layer between forward passes).
        max_length: the most positions the cache accepts.

    A backbone calls :meth:`check` once per forward pass (which grows the storage if needed),
    :meth:`update` once per layer (all layers write at the same offset, :attr:`length`), then
    :meth:`advance` once at the end, so a failure half-way leaves :attr:`length` unchanged.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("max_length", max_length),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GenerationError(f"KVCache {name} must be a positive int; got {value!r}")
        self._max_length = max_length
        self._allocate((num_layers, batch_size, num_kv_heads, 0, head_dim), dtype, device)
        self.length = 0

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views, made once per allocation so a decode step does no extra indexing.
        self._k = list(self.keys.unbind(0))
        self._v = list(self.values.unbind(0))

    # ----------------------------------------------------------------------------- properties
    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def capacity(self) -> int:
        """Positions allocated now (<= :attr:`max_length`)."""
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    # ----------------------------------------------------------------------------- operations
    def check(self, batch_size: int, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more rows of ``batch_size``, or raise
        :class:`~vlmkit.errors.GenerationError` (nothing changed) when they do not fit."""
        if batch_size != self.keys.shape[1]:
            raise GenerationError(
                f"KV cache was made for batch size {self.keys.shape[1]} but got a batch of {batch_size}",
                hint="make a new cache with backbone.new_cache(batch_size, max_length)",
            )
        need = self.length + new_tokens
        if need > self._max_length:
            raise GenerationError(
                f"KV cache is full: {self.length} filled + {new_tokens} new tokens > max_length "
                f"{self._max_length}",
                hint="make the cache with a larger max_length (prompt length + max_new_tokens)",
            )
        if need > self.keys.shape[3]:
            self.grow(need)

    def grow(self, need: int) -> None:
        """Reallocate to hold at least ``need`` positions (plus headroom, at most ``max_length``),
        keeping the filled part."""
        old = self.keys.shape[3]
        size = min(self._max_length, max(need + GROW_STEP, old + old // 2))
        shape = (*self.keys.shape[:3], size, self.keys.shape[4])
        keys = torch.zeros(shape, dtype=self.keys.dtype, device=self.keys.device)
        values = torch.zeros_like(keys)
        keys[:, :, :, : self.length].copy_(self.keys[:, :, :, : self.length])
        values[:, :, :, : self.length].copy_(self.values[:, :, :, : self.length])
        # Swapped in only once complete, so an interrupt (Ctrl-C) half-way loses nothing.
        self.keys, self.values = keys, values
        self._k, self._v = list(keys.unbind(0)), list(values.unbind(0))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, H_kv, T, head_dim)`` keys/values at ``[length, length + T)`` of ``layer``.

        Returns views of the filled part, ``(B, H_kv, length + T, head_dim)`` each. Does not move
        :attr:`length`; call :meth:`advance` after the last layer.
        """
        start = self.length
        end = start + k.shape[2]
        kc = self._k[layer]
        vc = self._v[layer]
        kc[:, :, start:end].copy_(k)
        vc[:, :, start:end].copy_(v)
        return kc[:, :, :end], vc[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled."""
        self.length += n

    def reset(self, length: int = 0) -> None:
        """Forget everything after ``length`` (0: empty the cache). Nothing is reallocated."""
        if not isinstance(length, int) or not 0 <= length <= self.length:
            raise GenerationError(f"cannot reset a KV cache of length {self.length} to {length!r}")
        self.length = length

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, kv_heads={self.num_kv_heads}, "
            f"length={self.length}/{self.max_length} (allocated {self.capacity}), head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device})"
        )
