"""Tiles of the batch-invariant linear kernel by row count: their speed, and whether they give the same bits
(a script, not a test).

    python tests/gpu/linear_tiles.py --out DIR

Random weights of Llama-3-8B's linear shapes (bf16). For every candidate tile setting and row count: the
milliseconds of one decode step's linear layers (each shape timed alone: several launches captured as one CUDA
graph, as the decode step runs them, so that no launch gap is counted; CUDA events, median of ``--repeats``; times
its count in the model: 32 layers of seven weights and the output layer), beside cuBLAS (``F.linear``),
and whether the outputs equal the default tiles' bit for bit on every shape. A row count can take other tiles
than another only where the two give the same bits: then a row's result still does not depend on the batch.
Also each weight shape's own time by tiles (tiles_by_shape.csv; the fastest tiles of each shape printed), and
the decode step's kernels at a grid's two lane shapes (eager, by the profiler; not with ``--no-kernels``). Writes
tiles.csv, tiles_by_shape.csv, tiles.md, equal.csv, kernels.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from attention_mass import milliseconds  # tests/gpu, the script's folder

from kvbench.engine.invariant_kernels import LINEAR_TILES, LinearTiles, invariant_linear

ROWS = (1, 16, 32, 64, 128, 256, 320, 384, 512)
CANDIDATES = [LINEAR_TILES, LinearTiles(64, 128, 64, 4, 4), LinearTiles(64, 128, 128, 4, 3),
              LinearTiles(128, 128, 64, 8, 3), LinearTiles(128, 128, 64, 8, 4), LinearTiles(128, 128, 128, 8, 3),
              LinearTiles(128, 256, 64, 8, 3), LinearTiles(128, 64, 64, 4, 4), LinearTiles(64, 64, 64, 4, 4),
              LinearTiles(64, 256, 64, 8, 3), LinearTiles(32, 64, 128, 4, 4), LinearTiles(16, 64, 128, 4, 4)]
#: (outputs, reduced): how many of that shape one decode step runs, Llama-3-8B
SHAPES = {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32, (128256, 4096): 1}


def graph_milliseconds(run, repeats: int, launches: int = 8) -> float:
    """GPU milliseconds of one run() call: ``launches`` calls replayed as one CUDA graph (timed alone, a small
    kernel's time would be mostly its launch)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            run()
    return milliseconds(graph.replay, repeats) / launches


def name(tiles: LinearTiles) -> str:
    return "x".join(map(str, tiles))


def sweep(repeats: int, row_counts: tuple[int, ...] = ROWS) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A step's linear layers by tiles and row count, whether each tile setting gives the default's bits, and each
    weight shape's own milliseconds by tiles (one launch), so tiles can be chosen per shape."""
    generator = torch.Generator("cuda").manual_seed(0)
    weights = {shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02
               for shape in SHAPES}
    times, equal, by_shape = [], [], []
    for rows in row_counts:
        step = {"rows": rows, "cublas": 0.0}
        same = {"rows": rows}
        for shape, count in SHAPES.items():
            x = torch.randn(rows, shape[1], device="cuda", dtype=torch.bfloat16, generator=generator)
            weight = weights[shape]
            cublas = graph_milliseconds(lambda: F.linear(x, weight), repeats)
            step["cublas"] += count * cublas
            by_shape.append({"rows": rows, "outputs": shape[0], "reduced": shape[1], "tiles": "cublas", "ms": cublas})
            reference = invariant_linear(x, weight, None, LINEAR_TILES)
            for tiles in CANDIDATES:
                key = name(tiles)
                try:
                    one = graph_milliseconds(lambda: invariant_linear(x, weight, None, tiles), repeats)
                    step[key] = step.get(key, 0.0) + count * one
                    by_shape.append({"rows": rows, "outputs": shape[0], "reduced": shape[1], "tiles": key, "ms": one})
                    same[key] = same.get(key, True) and torch.equal(invariant_linear(x, weight, None, tiles), reference)
                except Exception as error:  # too large for this GPU's shared memory
                    step[key], same[key] = float("nan"), None
                    print(f"{key}: {type(error).__name__}: {str(error).splitlines()[0][:100]}", flush=True)
        times.append(step)
        equal.append(same)
        print({key: round(value, 2) if isinstance(value, float) else value for key, value in step.items()}, flush=True)
        print("equal to default:", same, flush=True)
    return pd.DataFrame(times), pd.DataFrame(equal), pd.DataFrame(by_shape)


def decode_kernels(rows_and_slots: list[tuple[int, int]]) -> str:
    """The eager decode step's kernels, by the profiler, at each (rows, cached tokens) shape."""
    from torch.profiler import ProfilerActivity, profile

    from kvbench.engine.decode import synthetic_batch, synthetic_cache
    from kvbench.harness.bench import random_weight_model

    loaded = random_weight_model("llama3-8b", "bf16", "cuda", "sdpa")
    parts = []
    for rows, cache_tokens in rows_and_slots:
        kept = synthetic_cache(loaded.model, cache_tokens)
        batch = synthetic_batch(loaded.model, rows, kept, 40, use_cuda_graphs=False, batch_invariant=True)
        for _ in range(3):
            batch.step()
        del kept
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                batch.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        parts.append(f"## {rows} rows, {cache_tokens} cached tokens a row, 5 eager steps\n\n```\n{table}\n```\n")
        del batch
        torch.cuda.empty_cache()
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, comma-separated")
    parser.add_argument("--no-kernels", action="store_true", help="skip the decode step's kernel tables")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times, equal, by_shape = sweep(args.repeats, tuple(int(rows) for rows in args.rows.split(",")))
    times.round(3).to_csv(out / "tiles.csv", index=False)
    by_shape.round(4).to_csv(out / "tiles_by_shape.csv", index=False)
    # each shape's fastest tiles by row count (among those giving the default's bits), beside cuBLAS
    fastest = by_shape[by_shape.tiles != "cublas"].dropna().sort_values("ms").groupby(["rows", "outputs", "reduced"]).head(1)
    print(fastest.sort_values(["outputs", "reduced", "rows"]).to_markdown(index=False, floatfmt=".4f"))
    equal.to_csv(out / "equal.csv", index=False)
    header = f"ms of one decode step's linear layers (Llama-3-8B shapes, bf16), {torch.cuda.get_device_name()}"
    (out / "tiles.md").write_text(f"{header}\n\n{times.to_markdown(index=False, floatfmt='.2f')}\n\n"
                                  f"bitwise equal to the default tiles on every shape:\n\n"
                                  f"{equal.to_markdown(index=False)}\n", encoding="utf-8")
    print(times.to_markdown(index=False, floatfmt=".2f"))
    print(equal.to_markdown(index=False))
    if args.no_kernels:
        return
    kernels = decode_kernels([(256, 1024), (32, 8192)])
    (out / "kernels.md").write_text(kernels, encoding="utf-8")
    print(kernels)


if __name__ == "__main__":
    main()
