"""Elastic Cache's merge on the GPU (Triton): the mean of each anchor's segment of keys and values.

`kvbench.methods.elastic.merge_into_anchors` calls this on CUDA tensors; it imports triton, so nothing imports
this module on a machine without it. One program per (segment, KV head) reads the segment's tokens straight from
the layer's keys (then values), in blocks of ``BLOCK_T`` tokens in position order, sums them in float32 (each block
reduced by a fixed tree) and divides by the segment's length: the same order on every run, whatever else the GPU
runs (so a grid's Elastic rows equal the ones it gives alone). `torch.segment_reduce`, which the CPU path keeps,
took 0.56 ms a call on an H100 for a 5.5k-token layer, a fifth of a grid's prefill time on the device; it also
needs a float32 token-major copy of the keys and values first.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: tokens of a segment loaded and summed at once
BLOCK_TOKENS = 32


@triton.jit
def _segment_means(X, ENDS, OUT, stride_xh, stride_xt, stride_xd, stride_oh, stride_on, stride_od,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    segment = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    # segment i holds the tokens after ENDS[i] up to ENDS[i + 1]
    first = tl.load(ENDS + segment) + 1
    stop = tl.load(ENDS + segment + 1) + 1
    dims = tl.arange(0, BLOCK_D)
    in_head = dims < HEAD_DIM
    tokens = tl.arange(0, BLOCK_T)
    rows = X + head * stride_xh + dims[None, :] * stride_xd
    total = tl.zeros([BLOCK_D], tl.float32)
    for start in range(first, stop, BLOCK_T):
        at = start + tokens
        tile = tl.load(rows + at[:, None] * stride_xt, mask=(at < stop)[:, None] & in_head[None, :], other=0.0)
        total += tl.sum(tile.to(tl.float32), axis=0)
    mean = total / (stop - first).to(tl.float32)
    tl.store(OUT + head * stride_oh + segment * stride_on + dims * stride_od, mean.to(OUT.dtype.element_ty),
             mask=in_head)


def fused_segment_means(keys: torch.Tensor, values: torch.Tensor, ends: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean key and value of each segment: (1, Hkv, segments, d) each, in the inputs' dtype.

    keys, values: (1, Hkv, L, d); ends: (segments + 1,) int64 on the same device, ascending: segment ``i`` is the
    tokens ``ends[i] + 1 .. ends[i + 1]`` (none empty).
    """
    _, num_kv_heads, _, head_dim = keys.shape
    segments = ends.shape[0] - 1
    merged = []
    # triton launches on the current CUDA device (the interpreter, in the tests, runs on the CPU)
    with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():
        for tensor in (keys, values):
            out = torch.empty(1, num_kv_heads, segments, head_dim, dtype=tensor.dtype, device=tensor.device)
            _segment_means[(segments, num_kv_heads)](
                tensor, ends, out, tensor.stride(1), tensor.stride(2), tensor.stride(3),
                out.stride(1), out.stride(2), out.stride(3),
                HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=BLOCK_TOKENS,
                num_warps=4,
            )
            merged.append(out)
    return merged[0], merged[1]
