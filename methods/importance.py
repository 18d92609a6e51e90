"""Whole-prompt attention importance, shared by PrefixKV and Elastic Cache.

The score of prompt token ``j`` in a layer is the attention it receives from
every prompt query, causally, averaged over the query heads::

    score[j] = 1/Hq * sum_h sum_{i >= j} softmax_j(q_hi . k_hj * scaling)

which is what both references compute from the eager attention matrix
(``attentions.mean(heads).sum(query rows)``). Under GQA, query head ``h`` reads
KV head ``h // groups`` (the model's ``repeat_kv``), and the average runs over
all query heads, so there is one score per token per layer.

Memory: the attention matrix of a 32k-token prompt is never materialised. The
queries are taken in row chunks ``[a, a + c)``; a chunk only needs the keys
``[0, a + c)`` (causal), and its ``Hq * c * (a + c)`` logits are the only large
temporaries: the matmul output in the model dtype, the float32 copy that
softmax makes of it, and the float32 probabilities (10 bytes an element in
bf16/fp16, 8 in fp32). ``c`` is picked per chunk so that they stay under
``chunk_bytes`` (default 512 MiB, at least one row), so the extra peak memory is
about ``max(chunk_bytes, Hq * L * 10 B)`` plus O(Hq * c * head_dim + L). For a
32k prompt with 32 query heads one query row over all keys is
32 * 32768 * 10 B = 10 MiB, so the last chunks hold about 50 rows; early chunks
see fewer keys and take more rows.

Cost, measured on an H100 (bf16, Hq 32, Hkv 8, head_dim 128, 32k tokens), with
the extra peak memory it took: default 512 MiB budget, 209 ms per layer (6.7 s
for 32 layers) and 524 MiB; 256 MiB, 239 ms and 296 MiB; 1 GiB, 198 ms and
1042 MiB. That is about five times the layer's causal SDPA attention (39 ms),
since every attention probability is written to memory once. At 8k tokens,
about 15 ms per layer. A fused kernel (a row log-sum-exp pass, then column
sums of ``exp(logit - lse)`` without storing probabilities) would remove that
traffic; not written yet.
"""

from __future__ import annotations

import math

import torch

#: bound on the logits temporary of one query chunk (bytes)
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


def _chunk_rows(start: int, length: int, num_query_heads: int, bytes_per_element: int, chunk_bytes: int) -> int:
    """Largest c with num_query_heads * c * (start + c) * bytes_per_element <= chunk_bytes (at least 1)."""
    elements = chunk_bytes // (num_query_heads * bytes_per_element)
    rows = int((-start + math.sqrt(start * start + 4 * elements)) // 2)
    return max(1, min(rows, length - start))


def attention_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Column sums of the causal attention, averaged over query heads: float32 (prompt_length,).

    queries: (1, Hq, L, d) post-RoPE; keys: (1, Hkv, L, d) post-RoPE, un-repeated.
    Logits are computed in the inputs' dtype (as the model's eager attention does, the
    scaling applied to the queries), softmax and sums in float32.
    """
    _, num_query_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_query_heads // num_kv_heads
    # logits in the model dtype, softmax's float32 copy of them (not made for float32 logits), float32 probabilities
    bytes_per_element = queries.element_size() + 4 + (0 if queries.dtype == torch.float32 else 4)
    scores = torch.zeros(length, dtype=torch.float32, device=queries.device)
    start = 0
    while start < length:
        rows = _chunk_rows(start, length, num_query_heads, bytes_per_element, chunk_bytes)
        end = start + rows
        # (Hq, c, d) -> (Hkv, groups * c, d): query head h = kv * groups + g reads KV head kv.
        chunk = (queries[0, :, start:end] * scaling).reshape(num_kv_heads, groups * rows, head_dim)
        logits = torch.matmul(chunk, keys[0, :, :end].transpose(-1, -2)).view(num_query_heads, rows, end)
        future = torch.ones(rows, rows, dtype=torch.bool, device=queries.device).triu_(diagonal=1)
        logits[:, :, start:end].masked_fill_(future, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
        del logits
        scores[:end] += probabilities.view(-1, end).sum(dim=0)
        del probabilities
        start = end
    return scores.div_(num_query_heads)


def middle_range(prompt_length: int, start_size: int, protect_size: int) -> tuple[int, int]:
    """Bounds [lo, hi) of the compressible middle: after the first start_size, before the last protect_size."""
    lo = min(start_size, prompt_length)
    hi = max(lo, prompt_length - protect_size)
    return lo, hi


def rank_middle(scores: torch.Tensor, start_size: int, protect_size: int) -> torch.Tensor:
    """Middle positions (absolute) from most to least important; equal scores: the earlier token ranks first."""
    lo, hi = middle_range(scores.shape[-1], start_size, protect_size)
    order = torch.sort(scores[lo:hi], descending=True, stable=True).indices
    return order + lo


def protected_positions(prompt_length: int, start_size: int, protect_size: int, device=None) -> torch.Tensor:
    """The always-kept positions: the first start_size and the last protect_size."""
    lo, hi = middle_range(prompt_length, start_size, protect_size)
    return torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, prompt_length, device=device)])
