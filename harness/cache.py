"""A KV cache whose layers can be replaced by their compressed selection and grow in place.

Transformers' DynamicLayer concatenates on every decoding step, copying the whole
layer each time. Here, once a layer's prompt is stored (compressed or not), it sits
in a buffer with room for the tokens still to be decoded, and each decoding step
writes one slot: the per-step cost is reading the cache, not copying it.
Layers may hold different lengths (PyramidKV, WindowKV, PrefixKV budgets).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CompressibleLayer(DynamicLayer):
    """One layer's keys/values: ``keys``/``values`` are views of the first ``length`` buffer slots."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.keys
        self.value_buffer = self.values
        self.length = 0

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def store(self, keys: torch.Tensor, values: torch.Tensor, reserve: int) -> None:
        """Replace the layer's contents by ``keys``/``values``, leaving room for ``reserve`` more tokens."""
        batch, heads, length, _ = keys.shape
        self.key_buffer = keys.new_empty(batch, heads, length + reserve, keys.shape[-1])
        self.value_buffer = values.new_empty(batch, heads, length + reserve, values.shape[-1])
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.length = length
        self._set_views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.length == 0:
            # Prefill: attention reads the new states directly; the hook then calls `store`.
            self.keys, self.values = key_states, value_states
            self.length = key_states.shape[-2]
            self.key_buffer, self.value_buffer = key_states, value_states
            return key_states, value_states
        new = key_states.shape[-2]
        if self.length + new > self.key_buffer.shape[-2]:
            self.store(self.keys, self.values, reserve=max(new, self.length))
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._set_views()
        return self.keys, self.values

    def drop(self, index: int) -> None:
        """Remove the entry at cache index ``index``, shifting the later ones left."""
        if index < 0:
            index += self.length
        tail = slice(index + 1, self.length)
        self.key_buffer[:, :, index : self.length - 1] = self.key_buffer[:, :, tail].clone()
        self.value_buffer[:, :, index : self.length - 1] = self.value_buffer[:, :, tail].clone()
        self.length -= 1
        self._set_views()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


class CompressibleCache(Cache):
    """The cache the decode loop hands to the model: one CompressibleLayer per decoder layer."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=CompressibleLayer)

    def layer_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the stored keys and values (not of the spare decoding slots)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
