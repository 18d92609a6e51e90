"""Time the fused attention-mass kernel on a CUDA GPU (a script, not a test).

    python tests/gpu/attention_mass.py           # the table
    python tests/gpu/attention_mass.py --sweep   # and tile configurations of the kernel at 32k tokens

One layer's score at 8k/16k/32k/64k tokens, Hq 32, Hkv 8, head_dim 128, bf16 (random queries and
keys): milliseconds of the Triton kernel, of the chunked PyTorch path, and of a causal SDPA forward
(the layer's own attention, for scale); the kernel's largest and mean relative error against the chunked
path (per KV head); and the Jaccard of the kept top-k sets (k = 20% and 50% of the tokens) against the chunked
path's, for the head average (PrefixKV, Elastic) and per KV head (H2O; the worst head).
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton

from kvbench.methods.attention_mass_triton import DEFAULT_BLOCKS, fused_attention_mass
from kvbench.methods.importance import chunked_attention_mass, rank_middle

LENGTHS = (8192, 16384, 32768, 65536)
QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALING = HEAD_DIM**-0.5
KEEP_FRACTIONS = (0.2, 0.5)


def milliseconds(run, repeats: int) -> float:
    """Median CUDA time of run() after one warm-up call (which also compiles)."""
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the top-`keep` tokens, ranked as PrefixKV and Elastic rank (ties: earlier first)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[rank_middle(scores, 0, 0)[:keep]] = True
    return mask


def jaccard(fused: torch.Tensor, chunked: torch.Tensor, keep: int) -> float:
    a, b = kept(fused, keep), kept(chunked, keep)
    return ((a & b).sum() / (a | b).sum()).item()


def inputs(length: int):
    generator = torch.Generator(device="cuda").manual_seed(length)
    queries = torch.randn(1, QUERY_HEADS, length, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
    return queries, keys


def sdpa_milliseconds(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """The layer's own attention, for scale: a causal SDPA forward on the repeated keys and random values."""
    repeated_keys = keys.repeat_interleave(QUERY_HEADS // KV_HEADS, dim=1)
    values = torch.randn_like(repeated_keys)
    return milliseconds(
        lambda: F.scaled_dot_product_attention(queries, repeated_keys, values, is_causal=True, scale=SCALING), 5
    )


def table() -> None:
    jaccard_columns = [f"J{int(100 * fraction)}% avg/worst kv" for fraction in KEEP_FRACTIONS]
    header = f"{'tokens':>7} {'triton ms':>10} {'chunked ms':>11} {'sdpa ms':>8} {'triton/sdpa':>12}"
    print(header + f" {'max rel err':>12} {'mean rel err':>13} " + " ".join(jaccard_columns))
    for length in LENGTHS:
        queries, keys = inputs(length)
        fused_ms = milliseconds(lambda: fused_attention_mass(queries, keys, SCALING, per_kv_head=True), 5)
        chunked_ms = milliseconds(lambda: chunked_attention_mass(queries, keys, SCALING, per_kv_head=True), 3)
        sdpa_ms = sdpa_milliseconds(queries, keys)
        fused = fused_attention_mass(queries, keys, SCALING, per_kv_head=True)
        chunked = chunked_attention_mass(queries, keys, SCALING, per_kv_head=True)
        errors = (fused - chunked).abs() / chunked.abs()
        agreements = []
        for fraction in KEEP_FRACTIONS:
            keep = int(fraction * length)
            average = jaccard(fused.mean(dim=0), chunked.mean(dim=0), keep)
            worst_head = min(jaccard(fused[head], chunked[head], keep) for head in range(KV_HEADS))
            agreements.append(f"{average:.4f}/{worst_head:.4f}".rjust(len(jaccard_columns[0])))
        timings = f"{length:>7} {fused_ms:>10.1f} {chunked_ms:>11.1f} {sdpa_ms:>8.1f} {fused_ms / sdpa_ms:>12.2f}"
        print(timings + f" {errors.max().item():>12.2e} {errors.mean().item():>13.2e} " + " ".join(agreements))


def sweep(length: int = 32768) -> None:
    """Kernel time per tile configuration: each pass's tiles varied with the other pass's at the default."""
    queries, keys = inputs(length)
    candidates = [DEFAULT_BLOCKS]
    for lse_queries, lse_keys, lse_warps in [(128, 64, 4), (64, 64, 4), (128, 128, 8), (64, 32, 4)]:
        candidates.append(DEFAULT_BLOCKS._replace(lse_queries=lse_queries, lse_keys=lse_keys, lse_warps=lse_warps))
    for mass_queries, mass_keys, mass_warps in [(128, 64, 8), (64, 64, 4), (128, 128, 8), (32, 64, 4), (64, 128, 4)]:
        candidates.append(
            DEFAULT_BLOCKS._replace(mass_queries=mass_queries, mass_keys=mass_keys, mass_warps=mass_warps)
        )
    candidates += [DEFAULT_BLOCKS._replace(num_stages=stages) for stages in (2, 4)]
    print(f"\ntile sweep at {length} tokens (default {DEFAULT_BLOCKS})")
    timings = []
    for blocks in candidates:
        try:
            timing = milliseconds(lambda: fused_attention_mass(queries, keys, SCALING, True, blocks), 5)
        except triton.runtime.errors.OutOfResources as error:  # tiles too large for this GPU: report, try the next
            print(f"  {blocks}: failed ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
            continue
        timings.append((timing, blocks))
        print(f"  {timing:8.1f} ms  {blocks}")
    best_ms, best = min(timings)
    print(f"best: {best_ms:.1f} ms {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations at 32k tokens")
    arguments = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"Hq {QUERY_HEADS}, Hkv {KV_HEADS}, head_dim {HEAD_DIM}, bf16")
    table()
    if arguments.sweep:
        sweep()


if __name__ == "__main__":
    main()
