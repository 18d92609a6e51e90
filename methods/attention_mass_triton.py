"""Fused accumulated attention (Triton): the causal attention each prompt token receives from every prompt query.

`kvbench.methods.importance.attention_mass` calls this on CUDA tensors; it imports triton, so nothing
imports this module on a machine without it. It computes what the chunked PyTorch path computes
without writing a single attention probability to memory (results differ by float32 summation order,
and in 16-bit dtypes where a dot product summed in another order rounds to the neighbouring value).
Two passes:

1. ``_row_log_sum_exp``, one program per (query head, query block): the log-sum-exp of each query
   row's causal logits, by flash attention's online max and sum over key blocks.
2. ``_column_mass``, one program per (KV head, key block): every query row at or after the block's
   first key, of every query head in the KV head's group, adds ``exp(logit - lse)`` to its key's
   column. The probabilities accumulate elementwise in a (query x key) float32 tile that is reduced
   once at the end, so the inner loop has no cross-thread reduction. Keys are read once per program
   and never repeated for GQA (query head ``h`` reads KV head ``h // groups``).

Logits are those of the model's eager attention: ``q . k`` accumulated in float32 and rounded to the
inputs' dtype (what the matmul returns), then times ``scaling``, rounded again; everything after is
float32. They are kept in base-2 units (times log2 e) so each probability is one ``exp2``.
Extra memory: the row log-sum-exps, ``Hq * L`` float32, and the ``Hkv * L`` float32 result.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvbench.methods.importance import average_mass

_LOG2E = tl.constexpr(1.4426950408889634)


class Blocks(NamedTuple):
    """Tile sizes (powers of two, at least 16) and launch settings of the two passes.

    Pass 1 needs lse_keys to divide lse_queries. Each program keeps a (queries x keys) float32
    logits tile, and pass 2 a second one for its sums, in registers.
    """

    lse_queries: int = 128
    lse_keys: int = 64
    lse_warps: int = 8
    mass_queries: int = 64
    mass_keys: int = 128
    mass_warps: int = 4
    num_stages: int = 3


#: the fastest of 12 tile settings at 32k tokens, bf16, head_dim 128 on an H100 (tests/gpu/attention_mass.py
#: --sweep: 30.7 ms per layer, against 32.2-39.8 ms for the others); compiled for sm_90 without spills in
#: 16 bits. Float32 inputs (exactness checks) spill with them.
DEFAULT_BLOCKS = Blocks()


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> nearest bfloat16 (ties to even), as float32.

    In integer operations rather than a cast: this runs twice per logit, and Hopper issues float
    conversions at a quarter of its integer rate (CUDA's throughput table), the exp2 unit's rate.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _logits(q, k, scaling):
    """(q @ k^T) * scaling as eager attention computes it, in float32 and base-2 units."""
    logits = tl.dot(q, tl.trans(k), input_precision="ieee")  # "ieee": float32 inputs must not drop to TF32
    if q.dtype == tl.bfloat16:
        logits = _round_to_bfloat16(_round_to_bfloat16(logits) * scaling)
    elif q.dtype == tl.float16:
        logits = (logits.to(tl.float16).to(tl.float32) * scaling).to(tl.float16).to(tl.float32)
    else:
        logits = logits * scaling
    return logits * _LOG2E


@triton.jit
def _online_update(row_max, row_sum, logits):
    """Fold one key block's logits into each row's running max and sum of exp2(logit - max)."""
    new_max = tl.maximum(row_max, tl.max(logits, 1))
    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
    return new_max, row_sum


@triton.jit
def _row_log_sum_exp(
    Q, K, LSE, scaling, length,
    stride_qh, stride_ql, stride_qd, stride_kh, stride_kl, stride_kd,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    head = tl.program_id(0)
    # The latest query blocks see the most keys: launch them first so no long program starts last.
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    in_head = dims[None, :] < HEAD_DIM  # BLOCK_D pads a head_dim that is not a power of two
    q = tl.load(
        Q + head * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=(rows[:, None] < length) & in_head, other=0.0,
    )
    k_head = K + (head // GROUPS) * stride_kh + dims[None, :] * stride_kd
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    # Keys before the block's first row are visible to all its rows: no causal mask (BLOCK_K divides BLOCK_Q).
    diagonal = q_block * BLOCK_Q
    for start in range(0, diagonal, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        k = tl.load(k_head + cols[:, None] * stride_kl, mask=in_head, other=0.0)
        row_max, row_sum = _online_update(row_max, row_sum, _logits(q, k, scaling))
    # Every row sees its own key, so each row has a finite max after the first block here.
    for start in range(diagonal, tl.minimum(diagonal + BLOCK_Q, length), BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        k = tl.load(k_head + cols[:, None] * stride_kl, mask=(cols[:, None] < length) & in_head, other=0.0)
        logits = _logits(q, k, scaling)
        logits = tl.where(cols[None, :] <= rows[:, None], logits, float("-inf"))
        row_max, row_sum = _online_update(row_max, row_sum, logits)
    tl.store(LSE + head * length + rows, row_max + tl.log2(row_sum), mask=rows < length)


@triton.jit
def _query_block_probabilities(
    q_head, lse_head, k, cols, start, scaling, length, stride_ql, in_head,
    BLOCK_Q: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Attention probabilities of query rows [start, start + BLOCK_Q) on the program's keys: (BLOCK_Q, BLOCK_K).

    q_head: (1, BLOCK_D) pointers to the head's row 0; lse_head: the head's row log-sum-exps.
    """
    rows = start + tl.arange(0, BLOCK_Q)
    valid = rows < length
    q = tl.load(q_head + rows[:, None] * stride_ql, mask=valid[:, None] & in_head, other=0.0)
    # Rows past the prompt get lse = +inf, so their probabilities are exp2(-inf) = 0 without a mask.
    lse = tl.load(lse_head + rows, mask=valid, other=float("inf"))
    logits = _logits(q, k, scaling)
    if CAUSAL:
        logits = tl.where(cols[None, :] <= rows[:, None], logits, float("-inf"))
    return tl.exp2(logits - lse[:, None])


@triton.jit
def _column_mass(
    Q, K, LSE, MASS, scaling, length,
    stride_qh, stride_ql, stride_qd, stride_kh, stride_kl, stride_kd,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DIAGONAL_ROWS: tl.constexpr,
):
    kv_head = tl.program_id(0)
    # Key blocks are launched earliest first: they have the most queries after them.
    first_key = tl.program_id(1) * BLOCK_K
    cols = first_key + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    in_head = dims[None, :] < HEAD_DIM
    k = tl.load(
        K + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :] * stride_kd,
        mask=(cols[:, None] < length) & in_head, other=0.0,
    )
    mass = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
    # Query rows [first_key, first_key + DIAGONAL_ROWS) include every row that precedes one of the keys.
    diagonal_end = first_key + DIAGONAL_ROWS
    for group in range(GROUPS):
        head = kv_head * GROUPS + group
        q_head = Q + head * stride_qh + dims[None, :] * stride_qd
        lse_head = LSE + head * length
        for start in range(first_key, diagonal_end, BLOCK_Q):
            mass += _query_block_probabilities(
                q_head, lse_head, k, cols, start, scaling, length, stride_ql, in_head,
                BLOCK_Q, True,
            )
        for start in range(diagonal_end, length, BLOCK_Q):
            mass += _query_block_probabilities(
                q_head, lse_head, k, cols, start, scaling, length, stride_ql, in_head,
                BLOCK_Q, False,
            )
    tl.store(MASS + kv_head * length + cols, tl.sum(mass, 0), mask=cols < length)


def fused_attention_mass(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    per_kv_head: bool = False,
    blocks: Blocks = DEFAULT_BLOCKS,
) -> torch.Tensor:
    """`kvbench.methods.importance.attention_mass` by the Triton kernels (same arguments and result)."""
    return average_mass(fused_attention_mass_sums(queries, keys, scaling, blocks), queries.shape[1], per_kv_head)


def fused_attention_mass_sums(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                              blocks: Blocks = DEFAULT_BLOCKS) -> torch.Tensor:
    """`kvbench.methods.importance.attention_mass_sums` by the Triton kernels (same arguments and result)."""
    _, num_query_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_query_heads // num_kv_heads
    if blocks.lse_queries % blocks.lse_keys:
        raise ValueError(f"lse_keys ({blocks.lse_keys}) must divide lse_queries ({blocks.lse_queries})")
    q, k = queries[0], keys[0]
    for name, tensor in (("queries", q), ("keys", k)):
        # Element offsets are 32-bit in the kernels (about 500k tokens at 32 heads of 128).
        if sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) >= 2**31:
            raise ValueError(f"{name} {tuple(tensor.shape)} are too large for the kernel's 32-bit offsets")
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs at least 16
    shared = dict(GROUPS=groups, HEAD_DIM=head_dim, BLOCK_D=block_d, num_stages=blocks.num_stages)
    strides = (*q.stride(), *k.stride())
    row_lse = torch.empty(num_query_heads, length, dtype=torch.float32, device=queries.device)
    mass = torch.empty(num_kv_heads, length, dtype=torch.float32, device=queries.device)
    # Triton launches on the current CUDA device; a model split over GPUs has layers on others.
    with torch.cuda.device(queries.device) if queries.is_cuda else contextlib.nullcontext():
        _row_log_sum_exp[(num_query_heads, triton.cdiv(length, blocks.lse_queries))](
            q, k, row_lse, scaling, length, *strides,
            BLOCK_Q=blocks.lse_queries, BLOCK_K=blocks.lse_keys, num_warps=blocks.lse_warps, **shared,
        )
        _column_mass[(num_kv_heads, triton.cdiv(length, blocks.mass_keys))](
            q, k, row_lse, mass, scaling, length, *strides,
            BLOCK_Q=blocks.mass_queries, BLOCK_K=blocks.mass_keys, num_warps=blocks.mass_warps,
            DIAGONAL_ROWS=triton.cdiv(blocks.mass_keys, blocks.mass_queries) * blocks.mass_queries, **shared,
        )
    return mass
