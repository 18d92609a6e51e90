"""Elastic Cache (Liu et al., 2024): importance-driven merging into anchor tokens.

Every layer drops the same number of prompt tokens. In each layer the middle
tokens (all but the first ``start_size`` and the last ``protect_size``) are
ranked by importance (`kvbench.methods.importance`: attention received from all
prompt queries, averaged over query heads); the highest-ranked are the anchors,
kept. Each dropped token is merged into the anchor nearest to it in position
(equal distances: the earlier anchor): the anchor's key and value become the
mean of its own and those of every token merged into it. Only the protected
tokens and the anchors stay. ``--no-merge`` drops the same tokens without
merging (plain top-k eviction with the same scores, the paper's ablation).
While decoding, the cache is held at its size by fixed-point elimination
(`kvbench.methods.fixed_point`). Under GQA, one index set per layer (the
scores average all query heads), applied to every un-repeated KV head; each
head merges its own keys/values.

Differences from the reference (liuzuyan/ElasticCache, ``ElasticCache.__call__``)
and why:
  * Anchors are the top-ranked middle tokens, as the paper describes. The
    reference computes ``torch.where(argsort(scores) > forget_num)``, which
    compares the *token indices* that argsort returns with the drop count,
    not ranks: it keeps the tokens whose sorted slot holds an index above the
    drop count, an essentially arbitrary set; it also drops ``forget_num + 1``
    tokens (``<=``) and forgets the ``start_size`` offset for the dropped
    tokens, so it merges and gathers the wrong positions. We drop exactly the
    budget, the lowest-ranked tokens, at their real positions.
  * When every middle token is dropped there is no anchor: the dropped tokens
    are evicted without merging (the reference would fail).
  * Merging averages in float32 and casts back to the cache dtype (the reference
    averages in the cache dtype); the anchor itself counts once, as
    ``scatter_reduce(..., 'mean')`` with ``include_self`` does.
  * Decoding: see `kvbench.methods.fixed_point` (exact integer rule, ``--capacity``
    holds the size constant).

Where we follow the reference as it is: ``--ratio R`` drops ``int(L - L * (1 - R))``
tokens per layer, the reference's ``forget_num`` at prefill, truncated in floating
point (so R = 0.3 of 10 tokens drops 2, as there, not 3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.methods import register
from kvbench.methods.base import Compressor, LayerPrefill, ModelInfo, Selection, keep_positions, option
from kvbench.methods.fixed_point import FixedPointMethod, FixedPointSample
from kvbench.methods.importance import attention_importance, protected_positions, rank_middle


def nearest_anchor(positions: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """For each position, the anchor nearest to it (ties: the earlier one). ``anchors`` ascending, non-empty."""
    right = torch.searchsorted(anchors, positions).clamp(max=anchors.shape[0] - 1)
    left = (right - 1).clamp(min=0)
    left_distance = (positions - anchors[left]).abs()
    right_distance = (anchors[right] - positions).abs()
    return torch.where(left_distance <= right_distance, anchors[left], anchors[right])


def merge_into_anchors(
    keys: torch.Tensor, values: torch.Tensor, anchors: torch.Tensor, dropped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each anchor with the dropped tokens nearest to it: (1, Hkv, len(anchors), d) keys and values.

    anchors: ascending positions; dropped: positions merged into them.
    """
    targets = nearest_anchor(dropped, anchors)
    slot = torch.searchsorted(anchors, targets)  # index of the target within `anchors`
    counts = torch.ones(anchors.shape[0], dtype=torch.float32, device=keys.device)
    merged = []
    # On CUDA index_add_ adds by atomics in whatever order threads arrive, so a merged value could round
    # differently from run to run (and a grid's rows differ from a separate run's); its deterministic
    # variant sums in a fixed order.
    with deterministic_algorithms():
        counts.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32))
        for tensor in (keys, values):
            total = tensor[:, :, anchors].float()
            total.index_add_(2, slot, tensor[:, :, dropped].float())
            merged.append((total / counts.view(1, 1, -1, 1)).to(tensor.dtype))
    return merged[0], merged[1]


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic algorithms for the block (then the caller's setting again)."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@register
@dataclass(frozen=True, kw_only=True)
class ElasticCache(FixedPointMethod):
    name = "elastic"
    description = (
        "Same drop count in every layer; dropped tokens merged (averaged) into the nearest important anchor; "
        "fixed-point eviction while decoding."
    )

    merge: bool = option(True, "merge dropped tokens into their nearest anchor (--no-merge: plain eviction)")

    def ratio_drop(self, prompt_length: int) -> int:
        # The reference's forget_num = int(seq_len - num_of_token * (1 - ratio)), seq_len = num_of_token at prefill.
        return int(prompt_length - prompt_length * (1 - self.ratio))

    def prepare(self, model: ModelInfo, shared: dict[Any, Any] | None = None) -> Compressor:
        return ElasticCompressor(self, model)


class ElasticCompressor(Compressor):
    def start_sample(self, prompt_length: int, sample: dict | None = None) -> ElasticSample:
        return ElasticSample(self.method, prompt_length, self.model.num_layers)


class ElasticSample(FixedPointSample):
    """One sample: the same drop count in every layer."""

    method: ElasticCache

    def __init__(self, method: ElasticCache, prompt_length: int, num_layers: int):
        super().__init__(method, prompt_length, num_layers)
        self.drop = method.layer_drop(prompt_length)
        self.kept = [prompt_length - self.drop] * num_layers

    def select(self, layer: LayerPrefill) -> Selection | None:
        if self.drop == 0:
            return None
        method = self.method
        scores = attention_importance(layer.queries, layer.keys, layer.scaling)
        ranked = rank_middle(scores, method.start_size, method.protect_size)
        anchors = ranked[: ranked.shape[0] - self.drop].sort().values
        dropped = ranked[ranked.shape[0] - self.drop :]
        protected = protected_positions(layer.prompt_length, method.start_size, method.protect_size, scores.device)
        num_kv_heads = layer.keys.shape[1]
        selection = keep_positions(torch.cat([protected, anchors]), num_kv_heads)
        if not method.merge or anchors.numel() == 0:
            return selection
        anchor_keys, anchor_values = merge_into_anchors(layer.keys, layer.values, anchors, dropped)
        # Assemble in the selection's ascending order: protected tokens as they are, anchors merged.
        order = selection.indices[0, 0]
        is_anchor = torch.zeros(layer.prompt_length, dtype=torch.bool, device=order.device)
        is_anchor[anchors] = True
        keys = layer.keys[:, :, order]  # advanced indexing: copies
        values = layer.values[:, :, order]
        anchor_slots = is_anchor[order].nonzero().view(-1)
        keys[:, :, anchor_slots] = anchor_keys
        values[:, :, anchor_slots] = anchor_values
        return Selection(indices=selection.indices, keys=keys, values=values)
