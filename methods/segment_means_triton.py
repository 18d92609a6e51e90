"""Elastic Cache's merge on the GPU (Triton): the mean of each anchor's segment of keys and values.

`kvbench.methods.elastic.merge_into_anchors` calls this on CUDA tensors; it imports triton, so nothing imports
this module on a machine without it. Each segment is cut into chunks of ``CHUNK_TOKENS`` tokens in position
order; one program per (chunk, KV head) reads its chunk's keys and values straight from the layer's in blocks of
``BLOCK_TOKENS`` tokens, in order, each block reduced by a fixed tree, and writes their float32 sums; then one
program per (segment, KV head) adds its chunks' sums in order and divides by the segment's length. Two launches a
call, keys and values together. The same order on every run, whatever else the GPU runs (so a grid's Elastic rows
equal the ones it gives alone).

Why chunks: anchors are the tokens with the most attention mass, which piles up early in the prompt (every later
query sees an early token), so one segment often holds most of the prompt. Read by one program, block after
block, it took 0.26 ms a call on an H100 at 5.5k tokens, a quarter of a grid prefill's device time; in chunks,
its chunk sums took 76 us (the grid profile's device time, `tests/gpu/measure.sh grid-profile`). The chunks of all
segments are numbered on the device (no host wait): at most ``segments + tokens / CHUNK_TOKENS`` of them. Numbering
them takes eight small launches, which show only where the host launches slower than the device runs (as in
`tests/gpu/segment_means.py`: about 0.19 ms a call whatever the anchors). `torch.segment_reduce`, which the CPU
path keeps, took 0.56 ms a call and needs a float32 token-major copy first.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: tokens of a segment loaded and summed at once
BLOCK_TOKENS = 32
#: tokens of a segment one program sums (a multiple of BLOCK_TOKENS)
CHUNK_TOKENS = 256


@triton.jit
def _chunk_sums(K, V, CHUNK_SEGMENT, CHUNK_FIRST, ENDS, SUMS, chunks, stride_kh, stride_kt, stride_kd, stride_vh,
                stride_vt, stride_vd, stride_sc, stride_sx, stride_sh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    if chunk < tl.load(chunks):  # the bound the launch took may exceed the chunks there are
        segment = tl.load(CHUNK_SEGMENT + chunk)
        # segment s holds the tokens after ENDS[s] up to ENDS[s + 1]; this chunk, CHUNK of them from its first
        first = tl.load(ENDS + segment) + 1 + (chunk - tl.load(CHUNK_FIRST + segment)) * CHUNK
        stop = tl.minimum(tl.load(ENDS + segment + 1) + 1, first + CHUNK)
        dims = tl.arange(0, BLOCK_D)
        in_head = dims < HEAD_DIM
        tokens = tl.arange(0, BLOCK_T)
        key_rows = K + head * stride_kh + dims[None, :] * stride_kd
        value_rows = V + head * stride_vh + dims[None, :] * stride_vd
        key_total = tl.zeros([BLOCK_D], tl.float32)
        value_total = tl.zeros([BLOCK_D], tl.float32)
        for start in range(first, stop, BLOCK_T):
            at = start + tokens
            mask = (at < stop)[:, None] & in_head[None, :]
            key_total += tl.sum(tl.load(key_rows + at[:, None] * stride_kt, mask=mask, other=0.0).to(tl.float32), 0)
            value_total += tl.sum(tl.load(value_rows + at[:, None] * stride_vt, mask=mask, other=0.0).to(tl.float32),
                                  0)
        sums = SUMS + chunk * stride_sc + head * stride_sh + dims
        tl.store(sums, key_total, mask=in_head)
        tl.store(sums + stride_sx, value_total, mask=in_head)


@triton.jit
def _segment_means(SUMS, CHUNK_FIRST, ENDS, KEY_OUT, VALUE_OUT, stride_sc, stride_sx, stride_sh, stride_oh, stride_on,
                   stride_od, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    in_head = dims < HEAD_DIM
    key_total = tl.zeros([BLOCK_D], tl.float32)
    value_total = tl.zeros([BLOCK_D], tl.float32)
    for chunk in range(tl.load(CHUNK_FIRST + segment), tl.load(CHUNK_FIRST + segment + 1)):
        sums = SUMS + chunk * stride_sc + head * stride_sh + dims
        key_total += tl.load(sums, mask=in_head, other=0.0)
        value_total += tl.load(sums + stride_sx, mask=in_head, other=0.0)
    length = (tl.load(ENDS + segment + 1) - tl.load(ENDS + segment)).to(tl.float32)
    out = head * stride_oh + segment * stride_on + dims * stride_od
    tl.store(KEY_OUT + out, (key_total / length).to(KEY_OUT.dtype.element_ty), mask=in_head)
    tl.store(VALUE_OUT + out, (value_total / length).to(VALUE_OUT.dtype.element_ty), mask=in_head)


def fused_segment_means(keys: torch.Tensor, values: torch.Tensor, ends: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean key and value of each segment: (1, Hkv, segments, d) each, in the inputs' dtype.

    keys, values: (1, Hkv, L, d); ends: (segments + 1,) int64 on the same device, ascending: segment ``i`` is the
    tokens ``ends[i] + 1 .. ends[i + 1]`` (none empty).
    """
    _, num_kv_heads, length, head_dim = keys.shape
    segments = ends.shape[0] - 1
    # each segment's chunks, numbered in segment order: CHUNK_FIRST[s] .. CHUNK_FIRST[s + 1]
    chunk_counts = (torch.diff(ends) + (CHUNK_TOKENS - 1)) // CHUNK_TOKENS
    chunk_first = torch.nn.functional.pad(torch.cumsum(chunk_counts, 0), (1, 0))
    chunks_bound = segments + triton.cdiv(length, CHUNK_TOKENS)
    chunk_segment = torch.searchsorted(chunk_first, torch.arange(chunks_bound, device=ends.device), right=True) - 1
    # each chunk's key sums, then its value sums: one pass reads both, as a segment's keys and values merge alike
    sums = torch.empty(chunks_bound, 2, num_kv_heads, head_dim, dtype=torch.float32, device=keys.device)
    key_means, value_means = (torch.empty(1, num_kv_heads, segments, head_dim, dtype=tensor.dtype,
                                          device=tensor.device) for tensor in (keys, values))
    block_d = max(16, triton.next_power_of_2(head_dim))
    # triton launches on the current CUDA device (the interpreter, in the tests, runs on the CPU)
    with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():
        _chunk_sums[(chunks_bound, num_kv_heads)](
            keys, values, chunk_segment, chunk_first, ends, sums, chunk_first[-1:], keys.stride(1), keys.stride(2),
            keys.stride(3), values.stride(1), values.stride(2), values.stride(3), sums.stride(0), sums.stride(1),
            sums.stride(2), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=BLOCK_TOKENS, CHUNK=CHUNK_TOKENS, num_warps=4,
        )
        _segment_means[(segments, num_kv_heads)](
            sums, chunk_first, ends, key_means, value_means, sums.stride(0), sums.stride(1), sums.stride(2),
            key_means.stride(1), key_means.stride(2), key_means.stride(3), HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=1,
        )
    return key_means, value_means
