"""Batch-invariant decoding on a GPU: what it costs and what it fixes (a script, not a test).

    python tests/gpu/invariance.py --data-dir DIR --tokenizer DIR --out DIR [--limit 2]

Random weights of Llama-3-8B's shape, bf16, sdpa, one process; plain and batch-invariant decoding
(`kvbench.engine.invariant`) side by side:

1. ``decode_step.csv``: milliseconds per decode step (CUDA graph) at batch 1, 32 and `auto`, with 576 and
   4,096 cached tokens per row (``--cache-tokens``), plain and batch-invariant alternated in each round, the first round discarded.
2. ``linear.csv``: the batch-invariant linear kernel against ``F.linear`` (cuBLAS) at each of the model's
   weight shapes, 1 and 32 rows, with the default tiles and a few others (for tuning `LINEAR_TILES`).
3. ``workload.csv`` / ``samples.csv``: the LongBench mini set (``--limit`` samples per task; the first of each
   task also alone), snapkv-512 and fullkv, plain and batch-invariant: samples per hour, and the fraction of
   samples whose tokens batched (32, and `auto` where it differs) equal their tokens alone.
4. ``repeat.csv``: batch-invariant, the batched run again with the requests in reverse order (other rows, other
   neighbours, another buffer history): the fraction of samples whose tokens equal the first run's.

``--model tiny-llama --device cpu`` (with ``TRITON_INTERPRET=1``, a small ``--max-length`` and
``--max-new-tokens``) runs every part of the script on the CPU in minutes, to check it before GPU time is spent.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from kvbench.engine.decode import kv_head_layout
from kvbench.engine.generate import auto_batch_size, generate_stream
from kvbench.engine.invariant_kernels import LINEAR_TILES, LinearTiles, invariant_linear
from kvbench.engine.prefill import synchronize
from kvbench.harness import bench

METHODS = ("snapkv", "fullkv")
CAPACITY = 512
BATCH = 32
#: tiles tried besides the default (rows, outputs, reduced, warps, stages)
OTHER_TILES = [LinearTiles(16, 32, 128, 4, 4), LinearTiles(32, 64, 128, 4, 4), LinearTiles(32, 32, 256, 4, 3),
               LinearTiles(32, 16, 256, 4, 4), LinearTiles(32, 64, 64, 4, 6)]
#: a model of the same structure small enough for Triton's CPU interpreter (the dry run)
bench.MODEL_SHAPES["tiny-llama"] = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=258, max_position_embeddings=131072, rms_norm_eps=1e-5,
)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def milliseconds(run, repeats: int, device: torch.device) -> float:
    """Median time of run() after one warm-up call (which also compiles)."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_steps(loaded, batch_sizes: list[int], cache_sizes: list[int], steps: int) -> pd.DataFrame:
    tables = []
    model = loaded.model
    kv_heads, head_dim = kv_head_layout(model.config)
    free, _ = torch.cuda.mem_get_info(model.device) if model.device.type == "cuda" else (2**40, None)
    for cache_tokens in cache_sizes:
        # both kernels' batches are held at once: the sizes whose caches fit in half the free memory
        row_bytes = 2 * model.config.num_hidden_layers * kv_heads * head_dim * cache_tokens * model.dtype.itemsize
        fitting = [rows for rows in batch_sizes if 2 * rows * row_bytes <= free / 2]
        tables.append(bench.run_decode_step_bench(loaded, fitting, cache_tokens, steps, 3, say,
                                                  kernels=(False, True), eager=False))
    table = pd.concat(tables, ignore_index=True)
    plain = table[~table.batch_invariant].set_index(["batch", "cache_tokens"]).step_ms
    invariant = table[table.batch_invariant].set_index(["batch", "cache_tokens"]).step_ms
    ratio = (invariant / plain).round(3).rename("invariant_over_plain").reset_index()
    return table.merge(ratio, on=["batch", "cache_tokens"])


def linear_kernels(model, repeats: int) -> pd.DataFrame:
    """Each weight shape of the model, at 1 and 32 rows: F.linear against the kernel with each tile setting."""
    shapes = sorted({tuple(module.weight.shape) for module in model.modules() if type(module) is torch.nn.Linear})
    device, dtype = model.device, model.dtype
    rows_out = []
    for outputs, reduced in shapes:
        weight = torch.randn(outputs, reduced, device=device, dtype=dtype)
        for rows in (1, BATCH):
            x = torch.randn(rows, reduced, device=device, dtype=dtype)
            row = {"outputs": outputs, "reduced": reduced, "rows": rows,
                   "torch_ms": round(milliseconds(lambda: F.linear(x, weight), repeats, device), 4)}
            for tiles in [LINEAR_TILES, *OTHER_TILES]:
                name = "default" if tiles == LINEAR_TILES else "x".join(map(str, tiles))
                try:
                    row[f"{name}_ms"] = round(milliseconds(lambda: invariant_linear(x, weight, None, tiles),
                                                           repeats, device), 4)
                except Exception as error:  # tiles too large for this GPU: noted, the others still measured
                    say(f"tiles {tiles}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            rows_out.append(row)
            say(f"linear {outputs}x{reduced}, {rows} rows: {row}")
    return pd.DataFrame(rows_out)


def capped(requests, max_new_tokens: int | None):
    if max_new_tokens is not None:
        for request in requests:
            request.max_new_tokens = min(request.max_new_tokens, max_new_tokens)
    return requests


def workload(loaded, tokenizer, arguments, batch_sizes: list[int]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every method, plain and batch-invariant: the samples alone and in each batch size, and (batch-invariant)
    the largest batch again in reverse order."""
    model = loaded.model
    requests = capped(bench.longbench_requests(tokenizer, arguments.data_dir, arguments.limit, loaded.context_window,
                                               arguments.max_length), arguments.max_new_tokens)
    first_of_task = {}
    for request in requests:
        first_of_task.setdefault(request.tag[0], request)
    alone_requests = list(first_of_task.values())
    summary, samples, repeats = [], [], []
    for spec, method in bench.bench_methods(list(METHODS), CAPACITY).items():
        compressor = method.prepare(loaded.info)
        for invariant in (False, True):
            # warm-up: kernels, allocator, the CUDA graphs of the common buckets
            list(generate_stream(model, compressor, requests[:4], max(batch_sizes), batch_invariant=invariant))
            runs = {}
            plan = [("batch 1", alone_requests, 1)] + [(f"batch {size}", requests, size) for size in batch_sizes]
            if invariant:
                plan.append((f"batch {max(batch_sizes)}, reversed", list(reversed(requests)), max(batch_sizes)))
            for mode, mode_requests, rows in plan:
                synchronize(model.device)
                start = time.perf_counter()
                generations = list(generate_stream(model, compressor, mode_requests, rows, batch_invariant=invariant))
                seconds = time.perf_counter() - start
                runs[mode] = {generation.tag: generation.token_ids for generation in generations}
                summary.append({**bench.workload_row(spec, compressor, mode, rows, generations, seconds),
                                "batch_invariant": invariant})
                say(", ".join(f"{key} {value}" for key, value in summary[-1].items()))
            for size in batch_sizes:
                batched = runs[f"batch {size}"]
                for tag, tokens in runs["batch 1"].items():
                    samples.append({"method": spec, "batch_invariant": invariant, "batch_size": size, "task": tag[0],
                                    "_id": tag[1], "identical": tokens == batched[tag],
                                    "first_difference": bench.first_difference(tokens, batched[tag])})
            if invariant:
                first, again = runs[f"batch {max(batch_sizes)}"], runs[f"batch {max(batch_sizes)}, reversed"]
                repeats.append({"method": spec, "batch_size": max(batch_sizes), "samples": len(first),
                                "identical_rows": sum(first[tag] == again[tag] for tag in first) / len(first)})
    return pd.DataFrame(summary), pd.DataFrame(samples), pd.DataFrame(repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", choices=sorted(bench.MODEL_SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--limit", type=int, default=2, help="samples per task of the batched runs")
    parser.add_argument("--max-length", type=int, default=7950)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on each task's generation length")
    parser.add_argument("--cache-tokens", type=lambda text: [int(part) for part in text.split(",")],
                        default=[576, 4096], help="cached tokens per row of the decode step timings (comma list)")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size and round")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per linear kernel setting")
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    loaded = bench.random_weight_model(arguments.model, "bf16", arguments.device, "sdpa")
    model = loaded.model
    auto = auto_batch_size(model, batch_invariant=True)
    batch_sizes = sorted({BATCH, auto})
    header = (f"{bench.device_description(model)}, {loaded.name}, bf16, sdpa, torch {torch.__version__}; "
              f"--batch-size auto = {auto}")
    say(header)
    arguments.out.mkdir(parents=True, exist_ok=True)
    tables = {"decode_step": decode_steps(loaded, sorted({1, *batch_sizes}), arguments.cache_tokens,
                                                arguments.steps),
              "linear": linear_kernels(model, arguments.repeats)}
    tables["workload"], tables["samples"], tables["repeat"] = workload(
        loaded, bench.workload_tokenizer(loaded, arguments.tokenizer), arguments, batch_sizes)
    identical = (tables["samples"].groupby(["method", "batch_invariant", "batch_size"])["identical"]
                 .agg(["mean", "sum", "count"]).round(4).reset_index())
    tables["identical"] = identical
    report = [header]
    for name, table in tables.items():
        table.to_csv(arguments.out / f"{name}.csv", index=False)
        if name != "samples":
            report += ["", f"## {name}", "", table.to_markdown(index=False)]
    steps = tables["decode_step"]
    worst = steps[steps.batch.isin(batch_sizes) & steps.batch_invariant].invariant_over_plain.max()
    report += ["", f"largest batch-invariant / plain step ratio at batch {', '.join(map(str, batch_sizes))}: {worst}"
               f" (the default stays on where it is at most 1.3)"]
    (arguments.out / "invariance.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))


if __name__ == "__main__":
    main()
