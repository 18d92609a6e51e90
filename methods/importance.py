"""Whole-prompt attention mass: the importance score of PrefixKV and Elastic Cache (and H2O's, per KV head).

The mass of prompt token ``j`` in a layer is the causal attention it receives from every prompt
query, averaged over query heads::

    mass[j] = 1/Hq * sum_h sum_{i >= j} softmax_j(logit_hij),   logit_hij = (q_hi . k_hj) * scaling

which is what both references compute from the eager attention matrix
(``attentions.mean(heads).sum(query rows)``). Under GQA, query head ``h`` reads KV head
``h // groups`` (the model's ``repeat_kv``); `attention_mass(..., per_kv_head=True)` instead gives one
row per KV head, averaging that head's group of query heads (H2O's heavy hitters). The logits are
the eager attention's: the matmul in the inputs' dtype, then times ``scaling`` in that dtype; softmax
and sums are float32. (Scaling the queries first rounds differently in bf16: in the tests, scores off
by up to 4e-2 relative, 6e-3 on average, whenever ``scaling`` is not a power of two.)

Two paths compute it, chosen by `attention_mass`:

* CUDA with triton importable: the fused Triton kernel (`kvbench.methods.attention_mass_triton`), two
  flash-attention-style passes (each query row's log-sum-exp, then each key block's column sums of
  ``exp(logit - lse)``) that never write an attention probability to memory. Extra memory:
  ``(Hq + Hkv) * L`` float32.
* Otherwise (CPU, or no triton): `chunked_attention_mass`, PyTorch on query row chunks. A chunk
  ``[a, a + c)`` only needs the keys ``[0, a + c)`` (causal), and its ``Hq * c * (a + c)`` logits
  are the only large temporaries: the matmul output in the model dtype, the float32 copy that
  softmax makes of it, and the float32 probabilities (10 bytes an element in bf16/fp16, 8 in fp32).
  ``c`` is picked per chunk so that they stay under ``chunk_bytes`` (default 512 MiB, at least one
  row), so the extra peak memory is about ``max(chunk_bytes, Hq * L * 10 B)`` plus
  O(Hq * c * head_dim + Hkv * L). For a 32k prompt with 32 query heads one query row over all keys
  is 32 * 32768 * 10 B = 10 MiB, so the last chunks hold about 50 rows; early chunks see fewer keys
  and take more rows.

Cost on an H100 (bf16, Hq 32, Hkv 8, head_dim 128, 32k tokens). The chunked path, measured
while it still scaled the queries (scaling the logits adds one in-place pass over them), with the
extra peak memory it took: default
512 MiB budget, 209 ms per layer (6.7 s for 32 layers) and 524 MiB; 256 MiB, 239 ms and 296 MiB;
1 GiB, 198 ms and 1042 MiB; about five times the layer's causal SDPA attention (39 ms), since every
attention probability is written to memory once; at 8k tokens, about 15 ms per layer.
The fused kernel (``python tests/gpu/attention_mass.py``, torch 2.11, triton 3.6): 2.5 / 9.4 / 36.2
/ 144 ms per layer at 8k / 16k / 32k / 64k tokens against 16 / 59 / 233 / 1037 ms for the chunked
path (6.4-7.2x faster), and 2.5-2.8x the layer's own causal SDPA (0.9 / 3.4 / 13.2 / 56.8 ms),
with the first tiles; the tiles chosen by the sweep take 30.7 ms at 32k. Relative error against the
chunked path: at most 1.1e-4, 2e-7 on average; kept sets (top 20% and 50%) identical to it
(Jaccard 1.0000, averaged and per KV head).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from kvbench.methods.base import LayerPrefill

#: bound on the logits temporary of one query chunk of the PyTorch path (bytes)
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


def attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, per_kv_head: bool = False
) -> torch.Tensor:
    """Causal attention received by each prompt token from every prompt query, float32.

    queries: (1, Hq, L, d) post-RoPE; keys: (1, Hkv, L, d) post-RoPE, un-repeated (query head h
    reads KV head h // (Hq // Hkv)). Returns (L,), averaged over all query heads, or with
    per_kv_head (Hkv, L), each KV head averaging its group's query heads. Runs the fused Triton
    kernel on CUDA tensors where triton imports, else the chunked PyTorch path; both compute
    logits as eager attention does, ``(q @ k^T) * scaling`` in the inputs' dtype, and softmax and
    sums in float32.
    """
    return average_mass(attention_mass_sums(queries, keys, scaling), queries.shape[1], per_kv_head)


def attention_mass_sums(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(Hkv, L) float32: the attention each token receives, summed over each KV head's query group and over
    the queries (what `attention_mass` averages)."""
    if queries.is_cuda:
        fused = _fused_attention_mass_sums()
        if fused is not None:
            return fused(queries, keys, scaling)
    return chunked_attention_mass_sums(queries, keys, scaling)


def average_mass(sums: torch.Tensor, num_query_heads: int, per_kv_head: bool) -> torch.Tensor:
    """`attention_mass_sums` averaged: over each KV head's query group (``per_kv_head``), else over all query heads."""
    return sums / (num_query_heads // sums.shape[0]) if per_kv_head else sums.sum(dim=0) / num_query_heads


def _layer_mass_sums(layer: LayerPrefill, scaling: float) -> torch.Tensor:
    return attention_mass_sums(layer.queries, layer.keys, scaling)


def layer_attention_mass(layer: LayerPrefill, scaling: float, per_kv_head: bool = False) -> torch.Tensor:
    """`attention_mass` of a layer's queries and keys, the sums computed once per layer and ``scaling`` for
    every configuration of a grid (`LayerPrefill.shared`)."""
    return average_mass(layer.shared(_layer_mass_sums, scaling), layer.queries.shape[1], per_kv_head)


def attention_importance(layer: LayerPrefill) -> torch.Tensor:
    """The score PrefixKV and Elastic Cache rank by: the layer's `attention_mass` averaged over all query heads,
    with the model's own attention scaling, (L,)."""
    return layer_attention_mass(layer, layer.scaling)


@functools.cache
def _fused_attention_mass_sums():
    """The Triton path's entry point, or None where triton does not import; imported on first CUDA use only."""
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn("triton does not import: attention mass on CUDA falls back to the slower chunked PyTorch path")
        return None
    from kvbench.methods.attention_mass_triton import fused_attention_mass_sums

    return fused_attention_mass_sums


def _chunk_rows(start: int, length: int, num_query_heads: int, bytes_per_element: int, chunk_bytes: int) -> int:
    """Largest c with num_query_heads * c * (start + c) * bytes_per_element <= chunk_bytes (at least 1)."""
    elements = chunk_bytes // (num_query_heads * bytes_per_element)
    rows = int((-start + math.sqrt(start * start + 4 * elements)) // 2)
    return max(1, min(rows, length - start))


def chunked_attention_mass(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    per_kv_head: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """`attention_mass` in PyTorch, by query row chunks whose logits stay under chunk_bytes."""
    return average_mass(chunked_attention_mass_sums(queries, keys, scaling, chunk_bytes), queries.shape[1], per_kv_head)


def chunked_attention_mass_sums(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """`attention_mass_sums` in PyTorch, by query row chunks whose logits stay under chunk_bytes."""
    _, num_query_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_query_heads // num_kv_heads
    # logits in the model dtype, softmax's float32 copy of them (not made for float32 logits), float32 probabilities
    bytes_per_element = queries.element_size() + 4 + (0 if queries.dtype == torch.float32 else 4)
    mass = torch.zeros(num_kv_heads, length, dtype=torch.float32, device=queries.device)
    start = 0
    while start < length:
        rows = _chunk_rows(start, length, num_query_heads, bytes_per_element, chunk_bytes)
        end = start + rows
        # (Hq, c, d) -> (Hkv, groups * c, d): query head h = kv * groups + g reads KV head kv.
        chunk = queries[0, :, start:end].reshape(num_kv_heads, groups * rows, head_dim)
        # Scaled after the matmul, in the model dtype, as eager attention does (in place: no second temporary).
        logits = torch.matmul(chunk, keys[0, :, :end].transpose(-1, -2)).mul_(scaling).view(num_query_heads, rows, end)
        future = torch.ones(rows, rows, dtype=torch.bool, device=queries.device).triu_(diagonal=1)
        logits[:, :, start:end].masked_fill_(future, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
        del logits
        mass[:, :end] += probabilities.view(num_kv_heads, groups * rows, end).sum(dim=1)
        del probabilities
        start = end
    return mass


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


def ranked_by_importance(layer: LayerPrefill, start_size: int, protect_size: int) -> torch.Tensor:
    """`rank_middle` of the layer's `attention_importance`, sorted once for every configuration of a grid that
    ranks by it (Elastic Cache and PrefixKV at each capacity)."""
    return layer.shared(_ranked_by_importance, start_size, protect_size)


def _ranked_by_importance(layer: LayerPrefill, start_size: int, protect_size: int) -> torch.Tensor:
    return rank_middle(attention_importance(layer), start_size, protect_size)


def protected_positions(prompt_length: int, start_size: int, protect_size: int, device=None) -> torch.Tensor:
    """The always-kept positions: the first start_size and the last protect_size."""
    lo, hi = middle_range(prompt_length, start_size, protect_size)
    return torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, prompt_length, device=device)])
