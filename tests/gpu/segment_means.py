"""Elastic Cache's CUDA merge by anchor layout (a script, not a test).

    python tests/gpu/segment_means.py

A 5,477-token layer of Llama-3-8B's shape (8 KV heads of 128, bf16, the hook's strided layout), anchors clustered
at the start of the middle (as attention mass places them: one segment then holds most of the prompt) or spread at
random: milliseconds a call of the fused kernel (CUDA events, median of 20 after a warm-up) beside
``torch.segment_reduce`` over the same segments, whether repeated calls give the same bits, and the largest
difference from the float32 segment_reduce means (a bf16 rounding apart at most).
"""

from __future__ import annotations

import torch
from attention_mass import milliseconds  # this folder's script: the median CUDA time of a call

from kvbench.methods.elastic import middle_tokens, segment_bounds, segment_ends
from kvbench.methods.segment_means_triton import fused_segment_means


def main() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    length, heads, head_dim = 5477, 8, 128
    keys, values = (torch.randn(1, length, heads, head_dim, generator=generator, device="cuda",
                                dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    lo, hi = 4, length - 32
    layouts = {"500 clustered at the start": torch.arange(lo, lo + 500, device="cuda"),
               "100 clustered at the start": torch.arange(lo, lo + 100, device="cuda"),
               "500 at random": (torch.randperm(hi - lo, generator=generator, device="cuda")[:500] + lo).sort().values}
    print(f"{torch.cuda.get_device_name()}, {length} tokens, {heads} KV heads of {head_dim}, bf16")
    for name, anchors in layouts.items():
        ends = segment_ends(anchors, segment_bounds(keys.device, lo, hi))
        lengths = torch.diff(ends)
        middle = middle_tokens(keys, values, lo, hi)
        fused = fused_segment_means(keys, values, ends)
        repeated = all(torch.equal(a, b) for a, b in zip(fused, fused_segment_means(keys, values, ends)))
        reference = torch.segment_reduce(middle, "mean", lengths=lengths, axis=0).permute(1, 0, 2).chunk(2, dim=0)
        difference = max((mine[0].float() - theirs.float()).abs().max().item() for mine, theirs in zip(fused, reference))
        print(f"anchors {name} (longest segment {int(lengths.max())} tokens): fused "
              f"{milliseconds(lambda: fused_segment_means(keys, values, ends), 20):.3f} ms, segment_reduce "
              f"{milliseconds(lambda: torch.segment_reduce(middle, 'mean', lengths=lengths, axis=0), 20):.3f} ms, "
              f"repeatable {repeated}, largest difference {difference:.2e}")


if __name__ == "__main__":
    main()
