"""The compression hook: an attention function that wraps the model's own backend.

We register ``kvbench_<backend>`` (sdpa, eager, flash_attention_2) in transformers'
attention interface, so any model whose attention calls the interface (Llama,
Mistral, Qwen2, ... ) gets the hook without copying modeling code. The wrapper
runs the real backend, then, during prefill, hands the layer's post-RoPE queries
and un-repeated keys/values to the method and stores only what it keeps in the
cache, before the next layer runs: the full cache of all layers never coexists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Eager attention has no entry in the interface; Llama's is the generic one (repeat KV, softmax in fp32)
# that Mistral and Qwen2 share.
from transformers.models.llama.modeling_llama import eager_attention_forward

from kvbench.harness.cache import CompressibleCache
from kvbench.methods.base import LayerPrefill, Method

BACKENDS = ("sdpa", "eager", "flash_attention_2")
HOOKED_PREFIX = "kvbench_"


@dataclass
class CompressionSession:
    """What the hook needs while one sample is processed."""

    method: Method
    cache: CompressibleCache
    num_layers: int
    #: decoding slots to reserve after the stored prompt in each layer
    reserve: int
    #: scoring pre-pass: show each layer to ``method.observe`` and store nothing
    observing: bool = False

    def on_prefill(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        layer = LayerPrefill(module.layer_idx, self.num_layers, query, key, value, scaling)
        if self.observing:
            self.method.observe(layer)
        else:
            self.compress(layer)

    def compress(self, layer: LayerPrefill) -> None:
        """Store in the cache only what the method keeps of this layer's prompt."""
        key, value = layer.keys, layer.values
        selection = self.method.select(layer)
        if selection is None:
            kept_keys, kept_values = key, value
        elif selection.keys is not None:
            kept_keys, kept_values = selection.keys, selection.values
        else:
            gather_index = selection.indices.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])
            kept_keys, kept_values = key.gather(2, gather_index), value.gather(2, gather_index)
        self.cache.layers[layer.layer_idx].store(kept_keys, kept_values, reserve=self.reserve)


def _hooked(backend_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        backend = eager_attention_forward if backend_name == "eager" else ALL_ATTENTION_FUNCTIONS[backend_name]
        session: CompressionSession | None = getattr(module, "kvbench_session", None)
        is_prefill = query.shape[2] == key.shape[2] and query.shape[2] > 1
        if query.shape[2] == 1:
            # Batch 1, no padding: a single decoding query may see the whole cache. The mask built
            # for layer 0's length would not fit layers whose budgets differ.
            attention_mask = None
        output = backend(module, query, key, value, attention_mask, **kwargs)
        if session is not None and is_prefill:
            session.on_prefill(module, query, key, value, kwargs.get("scaling") or module.scaling)
        return output

    attention.__name__ = f"{HOOKED_PREFIX}{backend_name}"
    return attention


for _backend in BACKENDS:
    AttentionInterface.register(f"{HOOKED_PREFIX}{_backend}", _hooked(_backend))
    AttentionMaskInterface.register(f"{HOOKED_PREFIX}{_backend}", ALL_MASK_ATTENTION_FUNCTIONS[_backend])


def install_hook(model) -> None:
    """Route the model's attention through the hook (a no-op wrapper while no session is active)."""
    backend = model.config._attn_implementation
    if backend.startswith(HOOKED_PREFIX):
        return
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not supported by the kvbench hook ({', '.join(BACKENDS)})")
    model.set_attn_implementation(f"{HOOKED_PREFIX}{backend}")


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules that call the attention interface: those with a ``layer_idx`` and a ``scaling``."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


@contextlib.contextmanager
def compression(model, session: CompressionSession):
    """Make ``session`` active on every attention module for the duration of one sample."""
    modules = attention_modules(model)
    for module in modules:
        module.kvbench_session = session
    try:
        yield session
    finally:
        for module in modules:
            module.kvbench_session = None
