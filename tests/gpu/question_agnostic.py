"""The question-agnostic prefill against the question-aware one (a script, not a test).

    python tests/gpu/question_agnostic.py --out DIR    # question_agnostic.md and .csv in DIR

Random weights of Llama-3-8B's shape, bf16, sdpa, one random prompt of 32k tokens whose last
``--question-tokens`` are its question. For each method, question-aware (the whole prompt prefilled
and compressed) and question-agnostic (the context prefilled and compressed, then the question
extending the compressed cache, `kvbench.engine.extend`) alternate in one process, after a warm-up
of each; the table holds the median prefill seconds of each (the engine's own ``prefill_seconds``,
synchronized), their ratio (goal: at most 1.05) and each one's peak memory. tests/test_question_agnostic.py
runs `measure` and `write_table` on a tiny CPU model, so the script works the first time it meets a GPU.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

from kvbench.engine.generate import as_compressor
from kvbench.engine.prefill import DecodeRequest, prefill
from kvbench.harness.bench import bench_methods, random_weight_model

MODES = ("question-aware", "question-agnostic")


def measure(model, method_specs: list[str], lengths: list[int], question_tokens: int, capacity: int, repeats: int,
            say=print) -> pd.DataFrame:
    """Median prefill seconds and peak memory, question-aware and question-agnostic, per method and length."""
    compressors = {spec: as_compressor(method, model) for spec, method in bench_methods(method_specs, capacity).items()}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        prompt = torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist()
        starts = {"question-aware": None, "question-agnostic": length - question_tokens}
        for spec, compressor in compressors.items():
            def run(mode: str):
                request = DecodeRequest(prompt, 1, set(), {"task": "bench", "prompt_text": ""},
                                        question_start=starts[mode])
                return prefill(model, compressor, request)

            for mode in MODES:  # warm-up: kernels and the allocator before anything is timed
                run(mode)
            timings = {mode: [] for mode in MODES}
            peaks = {mode: [] for mode in MODES}
            kept = {}
            for repeat in range(repeats):
                # alternate the order too, so neither mode always runs on a just-warmed allocator
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    prefilled = run(mode)
                    timings[mode].append(prefilled.prefill_seconds)
                    peaks[mode].append(prefilled.peak_memory_bytes)
                    kept[mode] = sum(prefilled.kept_per_layer) / len(prefilled.kept_per_layer)
                    del prefilled
            medians = {mode: statistics.median(timings[mode]) for mode in MODES}
            say(f"{length} tokens {spec}: aware {medians['question-aware']:.4f}s, "
                f"agnostic {medians['question-agnostic']:.4f}s")
            rows.append({
                "prompt_tokens": length,
                "question_tokens": question_tokens,
                "method": spec,
                "aware_prefill_s": round(medians["question-aware"], 4),
                "agnostic_prefill_s": round(medians["question-agnostic"], 4),
                "agnostic_vs_aware": round(medians["question-agnostic"] / medians["question-aware"], 3),
                "aware_peak_gib": _median_gib(peaks["question-aware"]),
                "agnostic_peak_gib": _median_gib(peaks["question-agnostic"]),
                "aware_kept_tokens": round(kept["question-aware"], 1),
                "agnostic_kept_tokens": round(kept["question-agnostic"], 1),
                "repeats": repeats,
            })
    return pd.DataFrame(rows)


def _median_gib(values: list[int | None]) -> float | None:
    return None if values[0] is None else round(statistics.median(values) / 2**30, 2)


def write_table(table: pd.DataFrame, out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "question_agnostic.csv", index=False)
    (out / "question_agnostic.md").write_text(header + "\n\n" + table.to_markdown(index=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b", help="a random-weight shape of kvbench bench")
    parser.add_argument("--methods", default="fullkv,snapkv,pyramidkv,streamingllm")
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/gpu/agnostic"))
    args = parser.parse_args()
    loaded = random_weight_model(args.model, "bf16", "cuda", "sdpa")
    table = measure(loaded.model, args.methods.split(","), [int(n) for n in args.lengths.split(",")],
                    args.question_tokens, args.capacity, args.repeats)
    header = (f"{loaded.name}, bf16, sdpa, {torch.cuda.get_device_name()}, capacity {args.capacity}, "
              f"the last {args.question_tokens} prompt tokens are the question, median of {args.repeats} alternated")
    write_table(table, args.out, header)
    print(header)
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
