"""The extend step: new tokens prefilled over one sample's compressed cache (question-agnostic runs).

A question-agnostic run compresses the context without the question, then the question
part of the prompt runs through the model on top of the compressed cache: in every layer
its tokens attend to that layer's kept entries (each KV head its own) and causally to each
other, at the positions they have in the prompt (after the whole context, as decoding
continues after the prompt), and their keys and values join the cache uncompressed. The
cache object below hands each layer its kept entries followed by the new tokens' own; the
hook's `ExtendSession` attends over them (`kvbench.engine.hook.extend_attention`).
"""

from __future__ import annotations

import torch

from kvbench.engine.hook import ExtendSession, active, cache_keyword, install_hook


class _ExtendCache:
    """What attention sees as its cache during the extend: a layer's kept entries, then the new tokens'."""

    def __init__(self, kept: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kept = kept
        self.extended: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(kept)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kept_keys, kept_values = self.kept[layer_idx]
        self.kept[layer_idx] = None  # released as soon as copied: a full cache is never held twice whole
        keys = torch.cat([kept_keys, key_states], dim=2)
        values = torch.cat([kept_values, value_states], dim=2)
        self.extended[layer_idx] = (keys, values)
        return keys, values


@torch.inference_mode()
def extend(model, kept: list[tuple[torch.Tensor, torch.Tensor]], new_ids: list[int],
           first_position: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run ``new_ids`` (at positions ``first_position``...) over the per-layer ``kept`` (keys, values), each
    (1, kv_heads, kept, head_dim) post-RoPE: every layer's cache with the new tokens appended, and the
    logits of the last new token (vocab,). ``kept`` is consumed: each layer's entry is released (set to
    None) once that layer's extended cache is made."""
    install_hook(model)
    device = model.get_input_embeddings().weight.device
    input_ids = torch.as_tensor(new_ids, dtype=torch.long, device=device).view(1, -1)
    positions = torch.arange(first_position, first_position + input_ids.shape[1], device=device).view(1, -1)
    cache = _ExtendCache(kept)
    # A 4-D mask makes transformers skip building one (layers hold different numbers of kept entries);
    # the hook masks each layer itself.
    short_circuit_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    with active(model, ExtendSession()):
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=short_circuit_mask,
                       use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache}).logits
    if any(layer is None for layer in cache.extended):
        raise RuntimeError(f"the extend reached {sum(layer is not None for layer in cache.extended)} of "
                           f"{len(kept)} attention layers")
    return cache.extended, logits[0, -1]
