"""A preallocated key/value cache for incremental decoding.

One :class:`KVCache` holds every layer's keys and values in two tensors of shape
``(num_layers, B, H_kv, max_length, head_dim)``, allocated once. A forward pass over ``T`` new
tokens copies their keys/values into the slots ``[length, length + T)`` of each layer (no
``torch.cat`` per step, no reallocation) and then advances :attr:`KVCache.length` by ``T``.

Shape letters: ``B`` batch, ``H_kv`` key/value heads, ``T`` new tokens, ``L`` filled length
(``length + T`` during a forward pass).
"""

from __future__ import annotations

import torch

from .errors import GenerationError

__all__ = ["KVCache"]


class KVCache:
    """Preallocated per-layer key/value storage with a fill counter.

    Attributes:
        keys, values: ``(num_layers, B, H_kv, max_length, head_dim)`` storage.
        length: how many positions are filled (the same for every layer between forward passes).

    A backbone calls :meth:`check` once per forward pass, :meth:`update` once per layer (all layers
    write at the same offset, :attr:`length`), then :meth:`advance` once at the end, so a failure
    half-way leaves :attr:`length` unchanged.
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
            if not isinstance(value, int) or value <= 0:
                raise GenerationError(f"KVCache {name} must be a positive int; got {value!r}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views, made once so a decode step does no extra indexing.
        self._k = list(self.keys.unbind(0))
        self._v = list(self.values.unbind(0))
        self.length = 0

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
        """Raise :class:`~vlmkit.errors.GenerationError` unless ``new_tokens`` rows of ``batch_size`` fit."""
        if batch_size != self.keys.shape[1]:
            raise GenerationError(
                f"KV cache was made for batch size {self.keys.shape[1]} but got a batch of {batch_size}",
                hint="make a new cache with backbone.new_cache(batch_size, max_length)",
            )
        if self.length + new_tokens > self.keys.shape[3]:
            raise GenerationError(
                f"KV cache is full: {self.length} filled + {new_tokens} new tokens > max_length "
                f"{self.keys.shape[3]}",
                hint="make the cache with a larger max_length (prompt length + max_new_tokens)",
            )

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
        if not 0 <= length <= self.length:
            raise GenerationError(f"cannot reset a KV cache of length {self.length} to {length}")
        self.length = length

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, kv_heads={self.num_kv_heads}, "
            f"length={self.length}/{self.max_length}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )
