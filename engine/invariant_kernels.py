"""Batch-invariant decode kernels (Triton): a row's result never depends on the other rows or on the buffers' size.

A float reduction's result depends on its order. The libraries the decode step normally runs on choose that
order by shape: cuBLAS picks another matmul algorithm (tiling, split of the reduced dimension) per number of
rows, and attention over the decode buffers splits its keys by the buffers' capacity, which grows with the
samples a batch has held. In 16-bit floats such a change moves a logit by an ulp now and then, and a greedy
token flips. These kernels fix every reduction's order by what a row is, never by how many rows there are:

* `invariant_linear`: ``x @ W^T (+ b)`` in fixed tiles of rows, outputs and the reduced dimension, one
  program per tile, the reduced dimension walked whole in ``BLOCK_K`` steps in order (no split-K). The
  tiles do not depend on the weight's shape, so a row's every dot product is the same sequence of tile
  products whether it shares its tile with 0 or 63 other rows; rows past the last are loaded as zeros and
  never stored. Large batches take larger output tiles (`tiles_for`), only where they give the same bits.
* `invariant_rms_norm`: one program per row, the whole row's sum of squares in one block.
* `decode_attention`: one program per (row, KV head), holding the head's GQA group of queries; the row's
  slots are read a page at a time (the decode batch's paged pool, `kvbench.engine.decode`) from slot 0 up to
  its write position, in slot order wherever its pages lie, with an online softmax in float32; invalid slots
  (evicted, or never written) weigh exactly 0.

Each computes what the PyTorch op computes, up to float32 summation order and the final rounding
(tests/test_batch_invariant.py derives the tolerances). They run on CUDA, and on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``) where the tests check them; the decode step that uses them is captured
as a CUDA graph like the fast one (every shape-dependent choice is made on the host at capture, and a row's
write position is read by the kernel from device memory at each replay).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

_LOG2E = tl.constexpr(1.4426950408889634)


class LinearTiles(NamedTuple):
    """Tile sizes (powers of two, at least 16) and launch settings of `invariant_linear`: whatever the weight's shape
    (so one compiled kernel serves all), and fixed for every row count unless other tiles give the same bits."""

    rows: int = 64
    outputs: int = 64
    reduced: int = 128
    warps: int = 4
    stages: int = 3


#: chosen on an H200 (bf16, Llama-3-8B's seven layer weights x 32 layers plus the output layer, a CUDA graph per
#: row count; cuBLAS beside them): every linear layer of one decode step took 6.68 / 6.74 / 8.00 / 11.53 / 21.13 ms
#: at 1 / 32 / 85 / 256 / 512 rows, against 5.73 / 5.77 / 10.97 / 25.20 / 47.98 ms with 32 x 32 x 128 tiles
#: (cuBLAS, not batch-invariant: 4.82 / 4.91 / 5.10 / 6.79 / 11.41 ms). Small row tiles read each weight tile
#: once per 32 rows; these trade a millisecond at one row for half the time at the batches grids decode.
LINEAR_TILES = LinearTiles()
#: tiles for more than LARGE_TILES_FROM_ROWS rows: on an H100 (tests/gpu/linear_tiles.py, each shape's launches
#: replayed as a CUDA graph, as the decode step runs them) every linear layer of a step took 14.0 / 14.1 / 16.4 ms
#: at 320 / 384 / 512 rows, against 15.2 / 15.0 / 17.6 with 128 x 128 x 128 tiles and 17.4 / 19.5 / 22.6 with
#: LINEAR_TILES (cuBLAS: 8.4 / 9.7 / 11.4). The reduced dimension is walked in the same order in steps of 16, and the
#: tensor cores add each step's products into the accumulator in the same order whatever the tiles, so every output
#: element is the same sequence of operations: on that H100 seven tile settings (reduced tiles of 64 and 128 among
#: them) gave the same bits as LINEAR_TILES on every weight shape at 64 to 512 rows, as eleven had on an earlier one
#: at 1 to 512. `tiles_for` still checks this once per device and dtype before relying on it.
LARGE_TILES = LinearTiles(128, 128, 64, 8, 4)
LARGE_TILES_FROM_ROWS = 257


def tiles_for(rows: int, weight: torch.Tensor) -> LinearTiles:
    """The tiles `invariant_linear` uses for ``rows`` rows: LARGE_TILES from LARGE_TILES_FROM_ROWS rows where they give
    the same bits as LINEAR_TILES on this device and dtype, else LINEAR_TILES."""
    if rows >= LARGE_TILES_FROM_ROWS and weight.is_cuda and _large_tiles_agree(weight.device, weight.dtype):
        return LARGE_TILES
    return LINEAR_TILES


@functools.cache
def _large_tiles_agree(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether LARGE_TILES run here and give LINEAR_TILES' bits, on a probe spanning several tiles of each kind (an
    eager check: the decode step runs eagerly before it is captured as a CUDA graph)."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(LARGE_TILES.rows + 37, 3 * LARGE_TILES.reduced + 17, generator=generator, device=device).to(dtype)
    weight = torch.randn(2 * LARGE_TILES.outputs + 29, x.shape[1], generator=generator, device=device).to(dtype)
    try:
        large = invariant_linear(x, weight, None, LARGE_TILES)
    except triton.runtime.errors.OutOfResources:  # float32 tiles of this size need more shared memory than an H100 has
        return False
    agree = torch.equal(invariant_linear(x, weight, None, LINEAR_TILES), large)
    if not agree:
        log.warning("batch-invariant linear: %s tiles give other bits than %s on %s in %s; using %s for every row count",
                    LARGE_TILES, LINEAR_TILES, torch.cuda.get_device_name(device), dtype, LINEAR_TILES)
    return agree




def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device; a model split over GPUs has layers on others."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@triton.jit
def _linear(
    X, W, BIAS, Y, rows, outputs, reduced,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row tiles vary fastest in launch order: the programs sharing a weight tile run together (one read from memory).
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ids = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # a vocabulary x hidden weight passes 2^31
    in_rows = row_ids < rows
    in_outputs = out_ids < outputs
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, reduced, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        in_reduced = ks < reduced
        x = tl.load(X + row_ids[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=in_rows[:, None] & in_reduced[None, :], other=0.0)
        w = tl.load(W + out_ids[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=in_outputs[None, :] & in_reduced[:, None], other=0.0)
        accumulator = tl.dot(x, w, accumulator, input_precision="ieee")  # "ieee": float32 must not drop to TF32
    if HAS_BIAS:
        accumulator += tl.load(BIAS + out_ids, mask=in_outputs, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + row_ids[:, None] * stride_ym + out_ids[None, :] * stride_yn,
             accumulator.to(Y.dtype.element_ty), mask=in_rows[:, None] & in_outputs[None, :])


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tiles: LinearTiles | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` with each output row's reduction order fixed (see the module);
    ``tiles``: `tiles_for` the row count unless given."""
    outputs, reduced = weight.shape
    flat = x.reshape(-1, reduced)
    rows = flat.shape[0]
    tiles = tiles or tiles_for(rows, weight)
    result = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, tiles.rows), triton.cdiv(outputs, tiles.outputs))
    with _on_device(x):
        _linear[grid](
            flat, weight, bias if bias is not None else weight, result, rows, outputs, reduced,
            *flat.stride(), *weight.stride(), *result.stride(),
            HAS_BIAS=bias is not None, BLOCK_M=tiles.rows, BLOCK_N=tiles.outputs, BLOCK_K=tiles.reduced,
            num_warps=tiles.warps, num_stages=tiles.stages,
        )
    return result.view(*x.shape[:-1], outputs)


@triton.jit
def _rms_norm(X, WEIGHT, Y, width, stride_x, stride_y, epsilon, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, 0) / width
    # As the models' RMSNorm: normalised in float32, rounded to the input's dtype, then times the weight
    # (a 16-bit product is computed in float32 and rounded, as PyTorch's elementwise product is).
    normed = (x * tl.math.rsqrt(mean_square + epsilon)).to(X.dtype.element_ty).to(tl.float32)
    weight = tl.load(WEIGHT + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (weight * normed).to(Y.dtype.element_ty), mask=inside)


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dimension (Llama, Mistral, Qwen2's
    RMSNorm), one row per program; the result's dtype is the product's (``weight`` and ``x`` promoted)."""
    width = x.shape[-1]
    flat = x.reshape(-1, width)
    if flat.stride(-1) != 1:  # the kernel reads a row's elements side by side
        flat = flat.contiguous()
    result = torch.empty(flat.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    with _on_device(x):
        _rms_norm[(flat.shape[0],)](flat, weight, result, width, flat.stride(0), result.stride(0), epsilon,
                                    BLOCK=triton.next_power_of_2(width), num_warps=8 if width >= 4096 else 4)
    return result.view(x.shape)


@triton.jit
def _decode_attention(
    Q, K, V, VALID, PAGE_TABLE, WRITE_POS, LONGEST_FIRST, OUT, scaling,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kd,
    stride_vp, stride_vh, stride_vs, stride_vd,
    stride_valid_p, stride_valid_s, stride_table_b, stride_table_p, stride_write_pos, stride_longest_first,
    stride_ob, stride_oh, stride_od,
    KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
):
    # Programs start in launch order: the longest rows' heads first, so that a full cache's few long programs do not
    # start last and run on while the rest of the card has nothing left to do.
    row = tl.load(LONGEST_FIRST + (tl.program_id(0) // KV_HEADS) * stride_longest_first).to(tl.int64)
    kv_head = tl.program_id(0) % KV_HEADS
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUPS + group
    in_group = group < GROUPS  # BLOCK_G pads the group to a dot's 16 rows
    dims = tl.arange(0, BLOCK_D)
    in_head = dims < HEAD_DIM
    q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=in_group[:, None] & in_head[None, :], other=0.0)
    offsets = tl.arange(0, PAGE)
    # Every valid slot lies at or before the slot this step just wrote: the loop's length is the row's own.
    limit = (tl.load(WRITE_POS + row * stride_write_pos) + 1).to(tl.int32)
    # A finite start: a block with no valid slot then leaves the running max finite and adds exactly 0.
    row_max = tl.full([BLOCK_G], -1.0e30, tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    accumulator = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, limit, PAGE):
        # one page a block: the row's logical slots start .. start + PAGE, wherever the page lies in the pool
        page = tl.load(PAGE_TABLE + row * stride_table_b + (start // PAGE) * stride_table_p).to(tl.int64)
        in_row = start + offsets < limit
        k = tl.load(K + page * stride_kp + kv_head * stride_kh + offsets[:, None] * stride_ks + dims[None, :] * stride_kd,
                    mask=in_row[:, None] & in_head[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * (scaling * _LOG2E)
        valid = tl.load(VALID + page * stride_valid_p + offsets * stride_valid_s, mask=in_row, other=0) != 0
        logits = tl.where(valid[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        rescale = tl.exp2(row_max - new_max)
        probabilities = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probabilities, 1)
        v = tl.load(V + page * stride_vp + kv_head * stride_vh + offsets[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=in_row[:, None] & in_head[None, :], other=0.0)
        accumulator = accumulator * rescale[:, None] + tl.dot(probabilities.to(v.dtype), v, input_precision="ieee")
        row_max = new_max
    output = accumulator / row_sum[:, None]
    tl.store(OUT + row * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             output.to(OUT.dtype.element_ty), mask=in_group[:, None] & in_head[None, :])


def rows_longest_first(write_pos: torch.Tensor) -> torch.Tensor:
    """The rows (the last dimension of ``write_pos``: (..., rows)) by descending write position, ties in row order:
    the order `decode_attention` starts their programs in."""
    return torch.argsort(write_pos, dim=-1, descending=True, stable=True)


def decode_attention(query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, valid: torch.Tensor,
                     page_table: torch.Tensor, write_pos: torch.Tensor, scaling: float,
                     longest_first: torch.Tensor | None = None) -> torch.Tensor:
    """`kvbench.engine.hook.masked_decode_attention` over paged keys and values, each row's reduction order its own
    (a page a block, in the row's slot order, wherever its pages lie): (batch, 1, Hq, d).

    query (B, Hq, 1, d); key_pages/value_pages (pages, Hkv, page, d) un-repeated; valid (pages, page) bool;
    page_table (B, pages a row): the pool page of each row's slots ``i * page ..``; write_pos (B,): the slot each
    row wrote this step (no valid slot lies after it); longest_first (B,): the rows by descending write position
    (`rows_longest_first`; computed here if not given), the order their programs start in, which only decides
    when a row is computed, never how.
    """
    batch, num_heads, _, head_dim = query.shape
    num_kv_heads, page = key_pages.shape[1], key_pages.shape[2]
    groups = num_heads // num_kv_heads
    output = torch.empty(batch, 1, num_heads, head_dim, dtype=query.dtype, device=query.device)
    valid_bytes = valid.view(torch.uint8)
    if longest_first is None:
        longest_first = rows_longest_first(write_pos)
    with _on_device(query):
        _decode_attention[(batch * num_kv_heads,)](
            query, key_pages, value_pages, valid_bytes, page_table, write_pos, longest_first, output, scaling,
            query.stride(0), query.stride(1), query.stride(3),
            *key_pages.stride(), *value_pages.stride(),
            *valid_bytes.stride(), *page_table.stride(), write_pos.stride(0), longest_first.stride(0),
            output.stride(0), output.stride(2), output.stride(3),
            KV_HEADS=num_kv_heads, GROUPS=groups, BLOCK_G=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
            # float32 key and value tiles are twice the size: fewer in flight keeps them within shared memory
            num_warps=4, num_stages=2 if key_pages.element_size() == 4 else 3,
        )
    return output
