"""H2O, heavy-hitter oracle (Zhang et al., 2023), as KVCache-Factory runs it on LongBench.

What it keeps: each KV head keeps the recent window (the last ``window_size`` prompt tokens) plus
the ``capacity - window_size`` prefix tokens (positions before the window) that received the most
attention, summed over *every* prompt query under the causal mask (a key is scored only by the
queries at or after it). ``--capacity`` counts the window. Decoding appends (nothing is evicted).

LongBench defaults, those of the reference's ``run_longbench.py`` since 2024-07-10: window 8;
``--capacity`` is the reference's ``max_capacity_prompts`` (its default 512; the PyramidKV paper used
128 and 2048).

Where it follows the reference (``H2OKVCluster`` of ``pyramidkv/pyramidkv_utils.py`` at HEAD, the
2026-06-22 "Fix H2O causal masking" version):

* compresses when the prompt is at least the capacity long (``q_len >= capacity``); a shorter prompt
  is kept whole; at exactly the capacity every token is kept;
* scores all prompt queries against all keys with the full causal mask, softmax in float32, sums over
  the query axis and ranks only the prefix columns ``[:-window]``; the window itself is not scored;
* no pooling (the reference's pooling lines are commented out, so kernel size and pooling do not
  exist here); no merging (``merge`` is None on LongBench); no decode-time eviction (unlike the
  H2O paper, which also evicts while decoding);
* GQA: the reference's ``--kv_cache_granularity kv_head`` with ``gqa_score_agg='mean'``: each KV
  head averages the scores of its query group and the cache holds un-repeated heads (the
  reference's default, ``query_head``, repeats the KV heads first and selects per query head);
* logits are ``(q @ k^T) / sqrt(head_dim)`` on post-RoPE queries and keys, as the reference computes
  them whatever the model's own attention scaling (the same value for Llama, Mistral and Qwen2).

Where it differs:

* dtype: the reference casts the float32 softmax back to fp16 and sums it over the queries into an
  fp16 score (then averages the group in fp16); here the probabilities are summed and averaged in
  float32 (`attention_mass`), and the logits are multiplied by ``head_dim ** -0.5`` rather than
  divided by ``sqrt(head_dim)``. Rankings can differ where the reference's fp16 scores round to
  equal or swapped values, which is common among small scores;
* ties: ``torch.topk``'s order among equal scores is unspecified in the reference; here a stable
  descending sort decides, so among equal scores the earlier token is kept;
* order: the reference stores the heavy hitters in descending-score order, then the window; here
  kept positions are ascending per head. Keys are stored post-RoPE at their original positions, so
  attention does not depend on the order (only the floating-point summation order changes);
* memory: the reference materialises the full ``(H, L, L)`` attention per layer; `attention_mass`
  computes the same sums with the fused Triton kernel on CUDA, or by query chunks on CPU;
* history not reproduced: from 2024-10-13 to 2026-06-22 the reference masked only the last
  window x window block, so every query outside the window also attended to *future* keys (a mostly
  non-causal score without H2O's bias toward early tokens: the code WindowKV compared with); before
  2024-10-13 only the last ``window`` queries scored (SnapKV without pooling), with window 32 until
  2024-07-10, the era of the PyramidKV paper's Table 1. ``--window-size 32`` gives that era's
  window, not its score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Method, Selection, option, require_capacity_beyond
from kvbench.methods.importance import layer_attention_mass
from kvbench.methods.scoring import keep_ranked_prefix_and_window

CAPACITY_HELP = "tokens kept per layer per KV head, recent window included"


def heavy_hitter_scores(layer: LayerPrefill, window: int) -> torch.Tensor:
    """Causal attention each prefix token (before the last ``window``) receives from every prompt query,
    per KV head (its query group averaged): float32 (Hkv, prompt_length - window). The mass is computed once
    per layer for every configuration that ranks by it."""
    head_dim = layer.queries.shape[-1]
    mass = layer_attention_mass(layer, head_dim**-0.5, per_kv_head=True)
    return mass[:, : layer.prompt_length - window]


def heavy_hitter_ranking(layer: LayerPrefill, window: int) -> torch.Tensor:
    """Prefix positions per KV head from the most attended to the least, equal scores the earlier first (the
    reference sorts stably): (1, Hkv, prompt_length - window), sorted once per layer for every capacity."""
    return torch.sort(heavy_hitter_scores(layer, window).unsqueeze(0), dim=-1, descending=True, stable=True).indices


@register
@dataclass(frozen=True, kw_only=True)
class H2O(Method):
    name = "h2o"
    description = (
        "Keep the prefix tokens that received the most attention over the whole prompt (causal), "
        "plus the recent window (same budget every layer)."
    )

    capacity: int | None = option(None, CAPACITY_HELP)
    window_size: int = option(8, "recent window: last prompt tokens, always kept, not scored")

    def validate(self) -> None:
        require_capacity_beyond(self, "window_size", "the recent window")

    def select(self, layer: LayerPrefill) -> Selection | None:
        # The reference compresses when the prompt is at least the capacity long.
        if layer.prompt_length < self.capacity:
            return None
        ranking = layer.shared(heavy_hitter_ranking, self.window_size)
        return keep_ranked_prefix_and_window(ranking, self.capacity - self.window_size, layer.prompt_length)
