"""Where a grid's shared prefill spends its time (a script, not a test).

    python tests/gpu/grid_profile.py --data-dir DIR --tokenizer DIR --out OUT --methods ... --capacity ...

Random weights of Llama-3-8B's shape, bf16, sdpa; the first ``--limit`` LongBench mini samples of each task,
prompted as `kvbench run` prompts them. Each sample is prefilled twice, alternating: for one full-cache
configuration (the forward pass alone) and for every configuration of the grid at once. In the grid prefill
each configuration's ``select`` is timed (synchronized before and after, so the sum is what the layers'
selections cost beside the forward pass), and so is each configuration's decode-time eviction schedule, which
the engine works out on the CPU at the end of the prefill. The first round is a warm-up, not counted.
Writes grid_profile.md and grid_profile.csv: seconds per sample, by method and in total; and profiler.md: one grid
prefill's operators by host time and kernels by device time, and where it makes the host wait for the device.
tests/test_grid_sharing.py runs `measure` on a tiny CPU model, so the script works the first time it meets a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from kvbench.engine import prefill as prefill_module
from kvbench.engine.generate import as_compressor
from kvbench.engine.prefill import DecodeRequest, prefill_shared, synchronize
from kvbench.harness.bench import grid_configurations, random_weight_model
from kvbench.methods.fullkv import FullKV


def _timed(function, label: str, totals: dict[str, float], device: torch.device):
    def timed(*args, **kwargs):
        synchronize(device)
        started = time.perf_counter()
        result = function(*args, **kwargs)
        synchronize(device)
        totals[label] += time.perf_counter() - started
        return result
    return timed


def measure(model, info, configurations: dict[str, object], requests: list[DecodeRequest], say=print) -> pd.DataFrame:
    """Seconds per sample: the forward pass alone, the grid prefill, and within it each method's selections and
    eviction schedules (summed over that method's configurations). ``info``: the model as methods know it."""
    device = model.get_input_embeddings().weight.device
    labels = list(configurations)
    compressors = [method.prepare(info) for method in configurations.values()]
    method_of = [configurations[label].name for label in labels]
    forward_only = [as_compressor(FullKV(), model)]
    everyone = tuple(range(len(compressors)))
    per_sample: list[dict[str, float]] = []
    schedule = prefill_module.eviction_schedule
    for round_index, request in enumerate([requests[0]] + requests):
        totals: dict[str, float] = defaultdict(float)
        synchronize(device)
        started = time.perf_counter()
        prefill_shared(model, forward_only, request)
        synchronize(device)
        forward = time.perf_counter() - started

        original_start = [compressor.start_sample for compressor in compressors]
        for index, compressor in enumerate(compressors):
            def start_sample(*args, _start=original_start[index], _method=method_of[index], **kwargs):
                state = _start(*args, **kwargs)
                state.select = _timed(state.select, f"select {_method}", totals, device)
                return state
            compressor.start_sample = start_sample
        prefill_module.eviction_schedule = lambda state, *args: _timed(
            schedule, f"eviction schedule {state.method.name}", totals, device)(state, *args)
        try:
            synchronize(device)
            started = time.perf_counter()
            prefill_shared(model, compressors, replace(request, configurations=everyone))
            synchronize(device)
            grid = time.perf_counter() - started
        finally:
            prefill_module.eviction_schedule = schedule
            for compressor, start in zip(compressors, original_start):
                compressor.start_sample = start
        if round_index == 0:
            continue  # warm-up
        per_sample.append({"forward alone": forward, "grid prefill": grid, **totals})
        say(f"{request.tag}: {len(request.prompt_ids)} tokens, forward {forward:.3f} s, grid prefill {grid:.3f} s")
    keys = sorted({key for row in per_sample for key in row}, key=lambda key: (key not in ("forward alone", "grid prefill"), key))
    rows = [{"part": key, "configurations": sum(method_of[i] == key.split(" ")[-1] for i in everyone)
             if key.startswith(("select", "eviction")) else None,
             "mean_s_per_sample": statistics.mean(row.get(key, 0.0) for row in per_sample),
             "median_s_per_sample": statistics.median(row.get(key, 0.0) for row in per_sample)}
            for key in keys]
    table = pd.DataFrame(rows)
    table["share_of_grid_prefill"] = (table.mean_s_per_sample
                                      / table.loc[table.part == "grid prefill", "mean_s_per_sample"].iloc[0])
    return table


def warmed_up_grid(model, info, configurations: dict[str, object], request: DecodeRequest):
    """The configurations' compressors and ``request`` for all of them, after one grid prefill of it (first calls
    compile kernels and may synchronize while they set up)."""
    compressors = [method.prepare(info) for method in configurations.values()]
    shared = replace(request, configurations=tuple(range(len(compressors))))
    prefill_shared(model, compressors, shared)
    return compressors, shared


def profiled(model, info, configurations: dict[str, object], request: DecodeRequest) -> str:
    """One grid prefill of ``request`` under the profiler: the operators by host time (what launching costs) and
    the kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    compressors, shared = warmed_up_grid(model, info, configurations, request)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_shared(model, compressors, shared)
    averages = prof.key_averages()
    by_host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50)
    by_device = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=50)
    return (f"# One grid prefill, {len(request.prompt_ids)} tokens\n\n## By host time\n\n```\n{by_host}\n```\n\n"
            f"## By device time\n\n```\n{by_device}\n```\n")


def host_syncs(model, info, configurations: dict[str, object], request: DecodeRequest) -> str:
    """Where one grid prefill makes the host wait for the device (CUDA's sync debug mode): each place, its kvbench
    callers and how often. A wait stops the host launching until the device has run everything queued, so
    per-layer waits turn the overlap of the host's launches with the device's work into a sequence; one at the
    end (the first token) is expected."""
    import collections
    import traceback
    import warnings

    compressors, shared = warmed_up_grid(model, info, configurations, request)
    found: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        callers = [f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                   for frame in traceback.extract_stack()[:-1] if "kvbench" in frame.filename]
        found[(f"{Path(filename).name}:{lineno}", " < ".join(reversed(callers[-3:])))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill_shared(model, compressors, shared)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    rows = [{"count": count, "where": where, "kvbench callers": callers}
            for (where, callers), count in found.most_common()]
    table = pd.DataFrame(rows, columns=["count", "where", "kvbench callers"]).to_markdown(index=False)
    return f"# Host waits in one grid prefill, {len(request.prompt_ids)} tokens\n\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--capacity", default="128,256,512,1024")
    parser.add_argument("--limit", type=int, default=1, help="samples per task")
    parser.add_argument("--max-length", type=int, default=7950)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from kvbench.harness.bench import longbench_requests

    loaded = random_weight_model("llama3-8b", "bf16", "cuda", "sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    configurations = grid_configurations(args.methods.split(","), [int(c) for c in args.capacity.split(",")])
    requests = longbench_requests(tokenizer, args.data_dir, args.limit, loaded.context_window, args.max_length)
    table = measure(loaded.model, loaded.info, configurations, requests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    syncs = host_syncs(loaded.model, loaded.info, configurations, requests[-1])
    print(syncs)
    (out / "profiler.md").write_text(profiled(loaded.model, loaded.info, configurations, requests[-1]) + "\n" + syncs,
                                     encoding="utf-8")
    table.to_csv(out / "grid_profile.csv", index=False)
    header = (f"{len(configurations)} configurations, {len(requests)} samples (first round a warm-up), "
              f"{torch.cuda.get_device_name()}")
    markdown = table.to_markdown(index=False, floatfmt=".4f")
    (out / "grid_profile.md").write_text(f"{header}\n\n{markdown}\n", encoding="utf-8")
    print(header)
    print(markdown)


if __name__ == "__main__":
    main()
