"""Elastic Cache's fused merge kernel under Triton's CPU interpreter; prints the outcome as one JSON line.

Run by test_elastic.py as ``TRITON_INTERPRET=1 python tests/interpret_segment_means.py`` (the variable must be set
before triton is imported, hence a separate process). Against ``torch.segment_reduce`` (the CPU path) on the same
anchors: the largest error over the float32 bound (at most 1 where it holds: a sum of n terms errs by at most n
units of float32 of the sum of magnitudes, the division one more, then one rounding to the dtype), and whether
integer-valued inputs,
whose sums are exact in any order, give the very same means.
"""

import json

import torch
from triton_interpreter import round_bfloat16_casts_to_nearest, widen_bfloat16_in_dots

from kvbench.methods.elastic import merge_into_anchors, middle_tokens, segment_bounds, segment_ends
from kvbench.methods.segment_means_triton import fused_segment_means

if __name__ == "__main__":
    widen_bfloat16_in_dots()
    round_bfloat16_casts_to_nearest()
    generator = torch.Generator().manual_seed(0)
    excess, exact = {}, {}
    # a segment longer than a block of tokens, one of a single token; head_dim not a power of two; segments of
    # several chunks (one program each) beside one of a single chunk
    for dtype, heads, length, head_dim, anchors in ((torch.float32, 2, 90, 16, [3, 4, 50, 88]),
                                                     (torch.bfloat16, 3, 70, 80, [10, 11, 12, 60]),
                                                     (torch.float16, 1, 40, 32, [20]),
                                                     (torch.bfloat16, 2, 700, 64, [5, 6, 600])):
        lo, hi = 2, length - 1
        anchors = torch.tensor(anchors)
        for integers in (False, True):
            keys = torch.randn(1, heads, length, head_dim, generator=generator)
            values = torch.randn(1, heads, length, head_dim, generator=generator)
            if integers:
                keys, values = (keys * 8).round(), (values * 8).round()
            keys, values = keys.to(dtype), values.to(dtype)
            ends = segment_ends(anchors, segment_bounds(keys.device, lo, hi))
            fused = fused_segment_means(keys, values, ends)
            reference = merge_into_anchors(keys, values, anchors, lo, hi)  # the CPU path: segment_reduce
            case = f"{dtype} heads {heads} d {head_dim}"
            if integers:
                exact[case] = all(torch.equal(a, b) for a, b in zip(fused, reference))
                continue
            middle = middle_tokens(keys, values, lo, hi).double()  # (tokens, 2 heads, d)
            starts = (ends[:-1] + 1 - lo).tolist()
            worst = 0.0
            for index, (result, tensor) in enumerate(zip(fused, (keys, values))):
                for segment, (first, count) in enumerate(zip(starts, torch.diff(ends).tolist())):
                    part = middle[first:first + count, index * heads:(index + 1) * heads]  # (count, heads, d)
                    exact_mean = part.mean(0)
                    # the float32 sum and the division, then the rounding to the dtype
                    summed = 2.0**-23 * part.abs().sum(0) + 2.0**-24 * exact_mean.abs()
                    bound = summed + torch.finfo(dtype).eps / 2 * (exact_mean.abs() + summed)
                    error = (result[0, :, segment].double() - exact_mean).abs()
                    worst = max(worst, (error / bound.clamp_min(1e-300)).max().item())
            excess[case] = worst
    print(json.dumps({"excess": excess, "exact": exact}))
