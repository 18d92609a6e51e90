"""Elastic Cache's merge on the GPU (Triton): the mean of each anchor's segment of keys and values.

`kvbench.methods.elastic.merge_into_anchors` calls this on CUDA tensors; it imports triton, so nothing imports
this module on a machine without it. Each segment is cut into chunks of ``CHUNK_TOKENS`` tokens in position
order; one program per (chunk, KV head) reads its chunk straight from the layer's keys (then values) in blocks of
``BLOCK_TOKENS`` tokens, in order, each block reduced by a fixed tree, and writes its float32 sum; then one program
per (segment, KV head) adds its chunks' sums in order and divides by the segment's length. The same order on
every run, whatever else the GPU runs (so a grid's Elastic rows equal the ones it gives alone).

Why chunks: anchors are the tokens with the most attention mass, which piles up early in the prompt (every later
query sees an early token), so one segment often holds most of the prompt. Read by one program, block after
block, it took 0.26 ms a call on an H100 at 5.5k tokens, a quarter of a grid prefill's device time. The chunks
of all segments are numbered on the device (no host wait): at most ``segments + tokens / CHUNK_TOKENS`` of them.
`torch.segment_reduce`, which the CPU path keeps, took 0.56 ms a call and needs a float32 token-major copy first.
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
def _chunk_sums(X, CHUNK_SEGMENT, CHUNK_FIRST, ENDS, SUMS, chunks, stride_xh, stride_xt, stride_xd,
                stride_sc, stride_sh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                CHUNK: tl.constexpr):
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
        rows = X + head * stride_xh + dims[None, :] * stride_xd
        total = tl.zeros([BLOCK_D], tl.float32)
        for start in range(first, stop, BLOCK_T):
            at = start + tokens
            tile = tl.load(rows + at[:, None] * stride_xt, mask=(at < stop)[:, None] & in_head[None, :], other=0.0)
            total += tl.sum(tile.to(tl.float32), axis=0)
        tl.store(SUMS + chunk * stride_sc + head * stride_sh + dims, total, mask=in_head)


@triton.jit
def _segment_means(SUMS, CHUNK_FIRST, ENDS, OUT, stride_sc, stride_sh, stride_oh, stride_on, stride_od,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    in_head = dims < HEAD_DIM
    total = tl.zeros([BLOCK_D], tl.float32)
    for chunk in range(tl.load(CHUNK_FIRST + segment), tl.load(CHUNK_FIRST + segment + 1)):
        total += tl.load(SUMS + chunk * stride_sc + head * stride_sh + dims, mask=in_head, other=0.0)
    length = tl.load(ENDS + segment + 1) - tl.load(ENDS + segment)
    mean = total / length.to(tl.float32)
    tl.store(OUT + head * stride_oh + segment * stride_on + dims * stride_od, mean.to(OUT.dtype.element_ty),
             mask=in_head)


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
    sums = torch.empty(chunks_bound, num_kv_heads, head_dim, dtype=torch.float32, device=keys.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    merged = []
    # triton launches on the current CUDA device (the interpreter, in the tests, runs on the CPU)
    with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():
        for tensor in (keys, values):
            _chunk_sums[(chunks_bound, num_kv_heads)](
                tensor, chunk_segment, chunk_first, ends, sums, chunk_first[-1:], tensor.stride(1), tensor.stride(2),
                tensor.stride(3), sums.stride(0), sums.stride(1),
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=BLOCK_TOKENS, CHUNK=CHUNK_TOKENS, num_warps=4,
            )
            out = torch.empty(1, num_kv_heads, segments, head_dim, dtype=tensor.dtype, device=tensor.device)
            _segment_means[(segments, num_kv_heads)](
                sums, chunk_first, ends, out, sums.stride(0), sums.stride(1), out.stride(1), out.stride(2),
                out.stride(3), HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=1,
            )
            merged.append(out)
    return merged[0], merged[1]
