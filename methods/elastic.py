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

from dataclasses import dataclass
from typing import Any

import torch

from kvbench.methods import register
from kvbench.methods.base import Compressor, LayerPrefill, ModelInfo, Selection, option
from kvbench.methods.fixed_point import FixedPointMethod, FixedPointSample
from kvbench.methods.importance import middle_range, ranked_by_importance


def anchor_segments(anchors: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """How many consecutive middle tokens of ``[lo, hi)`` each anchor takes: every token goes to the anchor
    nearest to it (equal distances: the earlier anchor), the anchors themselves included, so the segments
    are contiguous and cover the middle. ``anchors``: ascending positions inside it, at least one."""
    # the tokens up to the midpoint of two neighbouring anchors go to the earlier one (ties included)
    ends = torch.cat([(anchors[:-1] + anchors[1:]) // 2, anchors.new_tensor([hi - 1])])
    return torch.diff(ends, prepend=anchors.new_tensor([lo - 1]))


def merge_into_anchors(keys: torch.Tensor, values: torch.Tensor, anchors: torch.Tensor, lo: int, hi: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's key and value averaged with those of the middle tokens nearest to it (`anchor_segments`):
    (1, Hkv, len(anchors), d) keys and values. Sums run in float32 over each segment in position order, the
    same order on every run and device (where CUDA's ``index_add_`` adds by atomics in a varying order, and its
    deterministic variant took 10 ms a layer at 8k tokens on an H200)."""
    lengths = anchor_segments(anchors, lo, hi)
    merged = []
    for tensor in (keys, values):
        middle = tensor[0, :, lo:hi].transpose(0, 1).float()  # (tokens, Hkv, d): segments along the first axis
        sums = torch.segment_reduce(middle, "sum", lengths=lengths, axis=0)
        means = sums / lengths.view(-1, 1, 1).to(sums.dtype)
        merged.append(means.to(tensor.dtype).transpose(0, 1).unsqueeze(0))
    return merged[0], merged[1]


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
        ranked = ranked_by_importance(layer, method.start_size, method.protect_size)
        anchors = ranked[: ranked.shape[0] - self.drop].sort().values
        lo, hi = middle_range(layer.prompt_length, method.start_size, method.protect_size)
        # ascending: the protected start, the anchors (all inside the middle [lo, hi)), the protected end
        positions = torch.cat([torch.arange(0, lo, device=anchors.device), anchors,
                               torch.arange(hi, layer.prompt_length, device=anchors.device)])
        indices = positions.view(1, 1, -1).expand(1, layer.keys.shape[1], -1).contiguous()
        if not method.merge or anchors.numel() == 0:
            return Selection(indices=indices)
        anchor_keys, anchor_values = merge_into_anchors(layer.keys, layer.values, anchors, lo, hi)
        # the protected tokens as they are, the anchors merged, by slices: no gather and no host sync
        keys = torch.cat([layer.keys[:, :, :lo], anchor_keys, layer.keys[:, :, hi:]], dim=2)
        values = torch.cat([layer.values[:, :, :lo], anchor_values, layer.values[:, :, hi:]], dim=2)
        return Selection(indices=indices, keys=keys, values=values)
