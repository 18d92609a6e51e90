"""Attention-based scores shared by the observation-window methods (SnapKV, PyramidKV, WindowKV), and the
selection of the top-scored prefix plus a window (SnapKV, PyramidKV, H2O)."""

from __future__ import annotations

import math

import torch

from kvbench.methods.base import Selection


def observation_window_attention(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over every key, per query head.

    queries: (1, Hq, L, d) post-RoPE; keys: (1, Hkv, L, d) un-repeated (GQA is
    handled by viewing the query heads of a group together, which is the same as
    repeating the keys the way ``repeat_kv`` does: query head h reads KV head h // groups).

    As in the KVCache-Factory reference: logits in the inputs' dtype scaled by
    1/sqrt(head_dim), the causal mask applied only inside the window (every
    window query sees the whole prefix), softmax in float32.
    Returns float32 probabilities of shape (1, Hq, window, L).
    """
    batch, num_query_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_query_heads // num_kv_heads
    window_queries = queries[:, :, -window:, :].reshape(batch, num_kv_heads, groups * window, head_dim)
    logits = torch.matmul(window_queries, keys.transpose(2, 3)) / math.sqrt(head_dim)
    logits = logits.view(batch, num_query_heads, window, length)
    future = torch.ones(window, window, dtype=torch.bool, device=queries.device).triu(diagonal=1)
    logits[..., -window:].masked_fill_(future, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def mean_over_groups(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(1, Hq, ...) per-query-head scores -> (1, Hkv, ...) by averaging each KV head's query group.

    This is the reference's ``gqa_score_agg='mean'`` for its kv-head cache layout.
    """
    batch, num_query_heads = scores.shape[:2]
    groups = num_query_heads // num_kv_heads
    if groups == 1:
        return scores
    return scores.view(batch, num_kv_heads, groups, *scores.shape[2:]).mean(dim=2)


def keep_top_prefix_and_window(scores: torch.Tensor, prefix_budget: int, prompt_length: int) -> Selection:
    """The top ``prefix_budget`` prefix positions per KV head by score (``topk``'s choice among equal scores, as
    SnapKV's and PyramidKV's reference takes them), plus every position after the scored prefix (the window);
    ascending per head. scores: (1, Hkv, prefix)."""
    return keep_ranked_prefix_and_window(scores.topk(prefix_budget, dim=-1).indices, prefix_budget, prompt_length,
                                         scores.shape[-1])


def keep_ranked_prefix_and_window(ranking: torch.Tensor, prefix_budget: int, prompt_length: int,
                                  prefix: int | None = None) -> Selection:
    """The first ``prefix_budget`` positions of ``ranking`` (1, Hkv, n: prefix positions per KV head, best first),
    plus every position after the ``prefix`` (default: ``n``, a ranking of the whole prefix); ascending per head."""
    num_kv_heads = ranking.shape[1]
    prefix = ranking.shape[-1] if prefix is None else prefix
    window = torch.arange(prefix, prompt_length, device=ranking.device).view(1, 1, -1).expand(1, num_kv_heads, -1)
    return Selection(indices=torch.cat([ranking[..., :prefix_budget].sort(dim=-1).values, window], dim=-1))
