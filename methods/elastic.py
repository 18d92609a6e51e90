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

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.methods import register
from kvbench.methods.base import Compressor, LayerPrefill, ModelInfo, Selection, option
from kvbench.methods.fixed_point import FixedPointMethod, FixedPointSample
from kvbench.methods.importance import middle_range, ranked_by_importance


def anchor_segments(anchors: torch.Tensor, lo: int, hi: int, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """How many consecutive middle tokens of ``[lo, hi)`` each anchor takes: every token goes to the anchor
    nearest to it (equal distances: the earlier anchor), the anchors themselves included, so the segments
    are contiguous and cover the middle. ``anchors``: ascending positions inside it, at least one; ``bounds``:
    `segment_bounds`, when made already."""
    return torch.diff(segment_ends(anchors, segment_bounds(anchors.device, lo, hi) if bounds is None else bounds))


def segment_ends(anchors: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(anchors + 1,): the last token before the first segment, then each anchor's segment's last token
    (`anchor_segments`); ``bounds``: `segment_bounds`."""
    # the tokens up to the midpoint of two neighbouring anchors go to the earlier one (ties included)
    return torch.cat([bounds[:1], (anchors[:-1] + anchors[1:]) // 2, bounds[1:]])


def segment_bounds(device: torch.device, lo: int, hi: int) -> torch.Tensor:
    """``[lo - 1, hi - 1]``: the end of the segment before the middle's first, and the last segment's end (the middle
    is not empty: ``hi > lo``)."""
    # made on the device: a tensor copied from a host list waits for the device's queue, so the host stops
    # launching until the prefill's work so far has run, once a layer
    return torch.arange(lo - 1, hi, hi - lo, device=device)


def middle_tokens(keys: torch.Tensor, values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The middle ``[lo, hi)``'s keys then values in float32, token-major: (tokens, 2 Hkv, d), the layout
    `torch.segment_reduce` reduces along."""
    return torch.cat([keys[0, :, lo:hi].transpose(0, 1), values[0, :, lo:hi].transpose(0, 1)], dim=1).float()


def merge_into_anchors(keys: torch.Tensor, values: torch.Tensor, anchors: torch.Tensor, lo: int, hi: int,
                       sources: tuple[torch.Tensor, torch.Tensor | None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's key and value averaged with those of the middle tokens nearest to it (`anchor_segments`):
    (1, Hkv, len(anchors), d) keys and values. Means run in float32 over each segment in position order, the
    same order on every run (where CUDA's ``index_add_`` adds by atomics in a varying order, and its
    deterministic variant took 10 ms a layer at 8k tokens on an H200): on CUDA by the fused kernel
    (`kvbench.methods.segment_means_triton`), else by ``torch.segment_reduce`` over `middle_tokens`.
    ``sources``: `merge_sources` of the layer, when made already."""
    bounds, middle = sources or merge_sources(keys, values, lo, hi)
    if middle is None:
        return _fused_segment_means()(keys, values, segment_ends(anchors, bounds))
    means = torch.segment_reduce(middle, "mean", lengths=anchor_segments(anchors, lo, hi, bounds), axis=0)
    return means.to(keys.dtype).permute(1, 0, 2).unsqueeze(0).chunk(2, dim=1)


def merge_sources(keys: torch.Tensor, values: torch.Tensor, lo: int, hi: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `merge_into_anchors` needs besides the anchors, the same for every anchor set of a layer:
    `segment_bounds`, and `middle_tokens` where the PyTorch path reduces them (None for the fused kernel)."""
    fused = keys.is_cuda and _fused_segment_means() is not None
    return segment_bounds(keys.device, lo, hi), None if fused else middle_tokens(keys, values, lo, hi)


@functools.cache
def _fused_segment_means():
    """The Triton merge, or None where triton does not import; imported on first CUDA use only."""
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn("triton does not import: Elastic Cache's merge on CUDA falls back to torch.segment_reduce")
        return None
    from kvbench.methods.segment_means_triton import fused_segment_means

    return fused_segment_means


def _protected(layer: LayerPrefill, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The protected positions before and after the middle, made once per layer for every capacity of a grid."""
    device = layer.keys.device
    return torch.arange(0, lo, device=device), torch.arange(hi, layer.prompt_length, device=device)


def _merge_sources(layer: LayerPrefill, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`merge_sources`, made once per layer for every capacity of a grid."""
    return merge_sources(layer.keys, layer.values, lo, hi)


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
        before, after = layer.shared(_protected, lo, hi)
        # ascending: the protected start, the anchors (all inside the middle [lo, hi)), the protected end
        indices = torch.cat([before, anchors, after]).view(1, 1, -1).expand(1, layer.keys.shape[1], -1)
        if not method.merge or anchors.numel() == 0:
            return Selection(indices=indices)
        anchor_keys, anchor_values = merge_into_anchors(layer.keys, layer.values, anchors, lo, hi,
                                                        layer.shared(_merge_sources, lo, hi))
        # the protected tokens as they are, the anchors merged, by slices: no gather and no host sync
        keys = torch.cat([layer.keys[:, :, :lo], anchor_keys, layer.keys[:, :, hi:]], dim=2)
        values = torch.cat([layer.values[:, :, :lo], anchor_values, layer.values[:, :, hi:]], dim=2)
        return Selection(indices=indices, keys=keys, values=values)
