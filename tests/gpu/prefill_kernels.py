"""Which kernels a prefill runs and what they cost, and the prefill with the model's RMSNorms, rotary embedding
and MLP gate beside kvbench's kernels for them (a script, not a test).

    python tests/gpu/prefill_kernels.py --lengths 6554,32768 --out OUT

Random weights of Llama-3-8B's shape, bf16, sdpa, one random prompt per length. Per length and method, the
prefill (`prefill_shared`) with the kernels the engine picks on CUDA (kvbench's RMSNorm, rotary and SiLU-gate
kernels) and with the model's own is timed alternately in this process, first round discarded, medians of
``--repeats``; then one prefill of each is profiled and its device time summed by kernel and by kind (matmul,
attention, normalisation, elementwise).
Writes prefill_kernels.md (the timings, model TFLOP/s, and the kernel tables).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

from kvbench.engine import prefill as prefill_module
from kvbench.engine.generate import as_compressor
from kvbench.engine.prefill import DecodeRequest, prefill_shared, synchronize
from kvbench.harness.bench import bench_methods, prefill_utilisation, random_weight_model

VARIANTS = ("kvbench kernels", "model's")

KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas")),
         ("attention", ("cudnn", "flash", "fmha", "attention")),
         ("rms norm", ("_rms_norm",)),
         ("kvbench elementwise", ("_rotate", "_silu_times")),
         ("reduction", ("reduce",)),
         ("elementwise", ("elementwise", "vectorized", "unrolled")),
         ("copy / index", ("copy", "index", "gather", "scatter", "cat")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(mark in name for mark in marks)), "other")


def kernels(variant: str):
    """The prefill with kvbench's RMSNorm, rotary and SiLU-gate kernels (as the engine runs it on CUDA) or the
    model's own."""
    ours = variant == "kvbench kernels"
    stack = contextlib.ExitStack()
    for choice in ("_kernel_norms_apply", "_kernel_elementwise_applies"):
        stack.enter_context(mock.patch.object(prefill_module, choice, return_value=ours))
    return stack


def timed_prefill(model, compressor, request, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    prefill_shared(model, [compressor], request)
    synchronize(device)
    return time.perf_counter() - started


def kernel_table(model, compressor, request) -> pd.DataFrame:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        prefill_shared(model, [compressor], request)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time_total / 1e3
            totals[event.name][1] += 1
    table = pd.DataFrame([{"kernel": name[:90], "kind": kind_of(name), "ms": round(ms, 3), "launches": count}
                          for name, (ms, count) in totals.items()])
    return table.sort_values("ms", ascending=False, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="6554,32768")
    parser.add_argument("--methods", default="fullkv,snapkv")
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = random_weight_model("llama3-8b", "bf16", "cuda", "sdpa")
    model, device = loaded.model, loaded.model.device
    compressors = {spec: as_compressor(method, model)
                   for spec, method in bench_methods(args.methods.split(","), args.capacity).items()}
    generator = torch.Generator().manual_seed(0)
    rows, sections = [], []
    for length in (int(value) for value in args.lengths.split(",")):
        request = DecodeRequest(torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist(),
                                1, set())
        for spec, compressor in compressors.items():
            seconds = defaultdict(list)
            for round_index in range(args.repeats + 1):
                for variant in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
                    with kernels(variant):
                        elapsed = timed_prefill(model, compressor, request, device)
                    if round_index:  # the first round warms up
                        seconds[variant].append(elapsed)
            for variant in VARIANTS:
                median = statistics.median(seconds[variant])
                tflops, _ = prefill_utilisation(model, [length], median)
                rows.append({"prompt_tokens": length, "method": spec, "kernels": variant,
                             "prefill_s": round(median, 4), "model_tflops": round(tflops, 1),
                             "of_790": round(tflops / 790, 3), "repeats": args.repeats})
                print(rows[-1], flush=True)
        for variant in VARIANTS:
            with kernels(variant):
                table = kernel_table(model, compressors["fullkv"], request)
            by_kind = table.groupby("kind")[["ms", "launches"]].sum().sort_values("ms", ascending=False)
            sections.append(f"## fullkv prefill, {length} tokens, {variant}: device time by kind\n\n"
                            f"{by_kind.to_markdown()}\n\ntotal {table.ms.sum():.1f} ms\n\n"
                            f"### top kernels\n\n{table.head(15).to_markdown(index=False)}\n")
            print(sections[-1], flush=True)
    timings = pd.DataFrame(rows)
    timings["vs_models"] = (timings.prefill_s / timings.groupby(["prompt_tokens", "method"]).prefill_s
                                 .transform(lambda column: column.iloc[-1])).round(3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# prefill kernels: {torch.cuda.get_device_name()}, llama3-8b random weights, bf16\n\n"
            f"{timings.to_markdown(index=False)}\n\n" + "\n".join(sections))
    (out / "prefill_kernels.md").write_text(text)
    print(timings.to_markdown(index=False))


if __name__ == "__main__":
    main()
