"""A grid-shaped decode step: its time by the rows it runs on, and where the time goes (a script, not a test).

    python tests/gpu/grid_step.py --out OUT [--short 275x600] [--long 11x7000] [--buckets 512,320]

Random weights of Llama-3-8B's shape, bf16, the batch-invariant kernels. One decode batch holds the rows a grid
decodes at once: ``--short`` compressed rows (count x cached tokens) and ``--long`` full-cache ones, every row
evicting a slot a step (the eviction of Elastic Cache and PrefixKV rows). The same rows are stepped as a CUDA
graph on each of ``--buckets`` rows (the active ones and free ones after them, as `DecodeBatch.step` pads a step
to its bucket), milliseconds a step over ``--steps`` steps after a warm-up; then one eager step on the first
bucket runs under the profiler, its kernels by device time. Writes grid_step.md and grid_step.csv.
tests/test_decode_pages.py runs `measure` on a tiny CPU model (eagerly), so the script works the first time it
meets a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from kvbench.engine.decode import DecodeBatch, synthetic_cache, synthetic_prefilled
from kvbench.engine.prefill import synchronize


def grid_batch(model, rows: list[tuple[int, int]], max_rows: int, new_tokens: int,
               batch_invariant: bool = True) -> DecodeBatch:
    """A decode batch of ``max_rows`` rows holding, for each (count, cached tokens) of ``rows``, that many rows of
    random caches, each evicting the 6th valid slot at every step."""
    batch = DecodeBatch(model, max_rows, batch_invariant=batch_invariant)
    samples = []
    for count, cached in rows:
        kept = synthetic_cache(model, cached)
        for _ in range(count):
            sample = synthetic_prefilled(kept, new_tokens)
            sample.evictions = [[5] * (new_tokens - 1) for _ in range(model.config.num_hidden_layers)]
            samples.append(sample)
    batch.admit(samples)
    return batch


def measure(model, rows: list[tuple[int, int]], buckets: list[int], steps: int,
            batch_invariant: bool = True) -> pd.DataFrame:
    """Milliseconds a step of the rows on each bucket (CUDA graphs where the batch captures them)."""
    active = sum(count for count, _ in rows)
    if min(buckets) < active:
        raise ValueError(f"a bucket of {min(buckets)} rows cannot hold {active} active rows")
    new_tokens = (steps + 3) * len(buckets) + 2  # every step of every bucket writes a slot
    batch = grid_batch(model, rows, max(buckets), new_tokens, batch_invariant)
    device = batch.device
    table = []
    for bucket in buckets:
        run = batch._captured_step if batch.use_cuda_graphs else batch._eager_step
        for _ in range(3):  # capture and warm-up
            if run(bucket) is None:
                run = batch._eager_step
                run(bucket)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            run(bucket)
        synchronize(device)
        table.append({"active_rows": active, "bucket": bucket, "cuda_graph": run != batch._eager_step,
                      "ms_per_step": round((time.perf_counter() - started) / steps * 1e3, 2)})
    return pd.DataFrame(table)


def kernels(model, rows: list[tuple[int, int]], bucket: int) -> str:
    """One eager step on ``bucket`` rows under the profiler: its kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    batch = grid_batch(model, rows, bucket, 8)
    batch._eager_step(bucket)  # warm-up
    synchronize(batch.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        batch._eager_step(bucket)
        synchronize(batch.device)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60)


def _rows(text: str) -> tuple[int, int]:
    count, cached = text.split("x")
    return int(count), int(cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=_rows, default=(275, 600), help="compressed rows: COUNTxCACHED")
    parser.add_argument("--long", type=_rows, default=(11, 7000), help="full-cache rows: COUNTxCACHED")
    parser.add_argument("--buckets", default="512,320")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from kvbench.harness.bench import random_weight_model

    model = random_weight_model("llama3-8b", "bf16", "cuda", "sdpa").model
    rows, buckets = [args.long, args.short], [int(bucket) for bucket in args.buckets.split(",")]
    table = measure(model, rows, buckets, args.steps)
    torch.cuda.empty_cache()
    profile = kernels(model, rows, buckets[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "grid_step.csv", index=False)
    header = (f"{args.short[0]} rows of {args.short[1]} cached tokens and {args.long[0]} of {args.long[1]}, every row "
              f"evicting, {torch.cuda.get_device_name()}")
    markdown = table.to_markdown(index=False)
    (out / "grid_step.md").write_text(f"{header}\n\n{markdown}\n\n## One eager step on {buckets[0]} rows\n\n"
                                      f"```\n{profile}\n```\n", encoding="utf-8")
    print(header)
    print(markdown)
    print(profile)


if __name__ == "__main__":
    main()
