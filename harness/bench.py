"""`kvbench bench`: speed and memory of the engine, one call, one table. Three workloads:

* ``prompts`` (default): every method at every prompt length, alone (batch 1), round-robin
  ``repeats`` times so a drifting clock hits all methods alike, medians: prefill seconds,
  decode milliseconds per token (beside the bound of reading the weights and the cache once),
  peak accelerator memory, the KV cache kept, ratios against the full cache.
* ``decode``: the decode step of a batch of 1, 8, 32, ... rows holding a given number of
  cached tokens each, captured as a CUDA graph and eager, alternated, first round discarded.

Every workload decodes with the batch-invariant kernels or without (``--batch-invariant``, the
default as for `kvbench run`); the decode and LongBench functions also take both, to compare them.
* ``longbench``: the run loop's engine over LongBench-shaped work (the data's prompts, built
  as `kvbench run` builds them, each decoding its task's whole generation length), alone and
  batched: samples per hour, decode tokens per second, the prefill share, peak memory, the
  full LongBench v1 (4,750 samples) projected from each task's measured cost, and how often
  the batched tokens equal the batch-1 tokens. With ``--grid``, every (method, capacity)
  configuration in one stream sharing each sample's prefill, beside the same configurations
  run one by one (on the first samples of each task): samples per hour and projected hours
  per configuration and for the whole grid.

Prefill rows also give the model FLOP/s reached (weights' matmuls and causal attention,
counted once) and, on a card of known peak, the model-FLOPs utilisation.

The model is a real checkpoint, or random weights of a public shape (``llama3-8b``, ...),
where weight values do not matter for timing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from kvbench.errors import KvbenchError, error_line
from kvbench.engine.decode import kv_head_layout, synthetic_batch, synthetic_cache
from kvbench.engine.generate import Generation, StreamStats, auto_batch_size, generate_greedy, generate_stream
from kvbench.engine.invariant import check_batch_invariant_device, resolve_batch_invariant
from kvbench.engine.prefill import DecodeRequest, synchronize
from kvbench.harness.run import longest_generations_first, max_prompt_length, method_label, sample_request
from kvbench.tasks import build_tasks
from kvbench.tasks.longbench_spec import LONGBENCH_TASKS
from kvbench.harness.model import (
    LoadedModel,
    check_attention_backend,
    load_model,
    load_model_config,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from kvbench.methods import build_method, get_method_class, parse_method_spec

#: Shapes of public models, for random-weight speed runs (no download needed).
MODEL_SHAPES = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
        max_position_embeddings=32768, sliding_window=None,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
        max_position_embeddings=32768, use_sliding_window=False,
    ),
}

#: Peak memory bandwidth (bytes/s) by device name fragment, for the decode bound.
MEMORY_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}
#: Dense bf16/fp16 tensor-core peak (FLOP/s) by device name fragment (datasheets, no sparsity), for the MFU.
PEAK_HALF_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def prefill_flops(model, prompt_tokens: int | list[int]) -> float:
    """Model FLOPs of prefills of ``prompt_tokens`` (one length or several): every decoder weight's matmul over
    each token (2 per weight and token), the causal attention's two products (half the square), and the last
    position's logits."""
    lengths = [prompt_tokens] if isinstance(prompt_tokens, int) else prompt_tokens
    config = model.config
    layer_weights = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    _, head_dim = kv_head_layout(config)
    attention = 2 * 2 * config.num_attention_heads * head_dim * sum(tokens * tokens for tokens in lengths) / 2
    logits = 2 * model.get_output_embeddings().weight.numel()
    return 2 * layer_weights * sum(lengths) + config.num_hidden_layers * attention + logits * len(lengths)


def prefill_utilisation(model, prompt_tokens: list[int], seconds: float) -> tuple[float, float | None]:
    """(model TFLOP/s, the fraction of the card's peak or None) of prefills of ``prompt_tokens`` in ``seconds``."""
    achieved = prefill_flops(model, prompt_tokens) / seconds
    peak = None
    if model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16):
        device_name = torch.cuda.get_device_name(model.device)
        peak = next((value for key, value in PEAK_HALF_FLOPS.items() if key in device_name), None)
    return achieved / 1e12, None if peak is None else achieved / peak


def random_weight_model(shape: str, dtype: str, device: str, attn: str) -> LoadedModel:
    """A model of a public shape with random weights, built directly on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attention_backend(attn)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    settings = dict(MODEL_SHAPES[shape])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return LoadedModel(model=model, tokenizer=None, name=f"{shape}-random")


def bench_methods(method_specs: list[str], capacity: int) -> dict[str, object]:
    """spec -> configured method; ``capacity`` goes to the methods that have one (unless the spec sets it)."""
    methods = {}
    for spec in method_specs:
        name, options = parse_method_spec(spec)
        if any(option.name == "capacity" for option in get_method_class(name).option_specs()):
            options.setdefault("capacity", capacity)
        methods[spec] = build_method(name, **options)
    return methods


def device_description(model) -> str:
    return torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"


def decode_bound_ms(model, kv_cache_bytes: int) -> float | None:
    """Milliseconds per token to read every weight and the whole cache once at peak bandwidth."""
    if model.device.type != "cuda":
        return None
    device_name = torch.cuda.get_device_name(model.device)
    bandwidth = next((value for key, value in MEMORY_BANDWIDTH.items() if key in device_name), None)
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weight_bytes + kv_cache_bytes) / bandwidth * 1e3


def run_bench(loaded: LoadedModel, method_specs: list[str], lengths: list[int], capacity: int,
              new_tokens: int, repeats: int, progress=print, batch_invariant: bool = False) -> pd.DataFrame:
    model = loaded.model
    vocab = model.config.vocab_size
    methods = {spec: method.prepare(loaded.info) for spec, method in bench_methods(method_specs, capacity).items()}
    generator = torch.Generator().manual_seed(0)
    # Warm-up: kernels, allocator and autotuning before anything is timed.
    warm_prompt = torch.randint(0, vocab, (min(lengths),), generator=generator).tolist()
    for method in methods.values():
        generate_greedy(model, warm_prompt, method, 2, set(), batch_invariant=batch_invariant)
    rows = []
    for length in lengths:
        prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
        samples = {spec: [] for spec in methods}
        for repeat in range(repeats):
            for spec, method in methods.items():
                # No EOS: every run decodes exactly `new_tokens`, so decode times compare.
                generation = generate_greedy(model, prompt, method, new_tokens, set(),
                                             sample={"task": "bench", "prompt_text": ""},
                                             batch_invariant=batch_invariant)
                samples[spec].append(generation)
                progress(f"length {length} {spec} repeat {repeat + 1}/{repeats}: "
                         f"prefill {generation.prefill_seconds:.3f}s")
        for spec, generations in samples.items():
            kv_bytes = generations[0].kv_cache_bytes
            decode_ms = statistics.median(g.decode_seconds / max(len(g.token_ids) - 1, 1) for g in generations) * 1e3
            peak = [g.peak_memory_bytes for g in generations]
            bound = decode_bound_ms(model, kv_bytes)
            prefill_s = statistics.median(g.prefill_seconds for g in generations)
            tflops, mfu = prefill_utilisation(model, [length], prefill_s)
            rows.append({
                "prompt_tokens": length,
                "method": spec,
                "capacity": methods[spec].method.budget,
                "prefill_s": round(prefill_s, 4),
                "prefill_tflops": round(tflops, 1),
                "prefill_mfu": None if mfu is None else round(mfu, 3),
                "decode_ms_per_token": round(decode_ms, 2),
                "decode_bound_ms": None if bound is None else round(bound, 2),
                "peak_memory_gib": None if peak[0] is None else round(statistics.median(peak) / 2**30, 2),
                "kv_cache_mib": round(kv_bytes / 2**20, 1),
                "kept_tokens_mean": round(sum(generations[0].kept_per_layer) / len(generations[0].kept_per_layer), 1),
                "repeats": repeats,
            })
    table = pd.DataFrame(rows)
    for length in lengths:
        full = table[(table.prompt_tokens == length) & (table.method == "fullkv")]
        if len(full):
            mask = table.prompt_tokens == length
            table.loc[mask, "prefill_vs_fullkv"] = (table.loc[mask, "prefill_s"] / full.prefill_s.iloc[0]).round(3)
            if full.peak_memory_gib.iloc[0] is not None:
                table.loc[mask, "peak_vs_fullkv"] = (
                    table.loc[mask, "peak_memory_gib"] / full.peak_memory_gib.iloc[0]).round(3)
    return table


def write_bench(table: pd.DataFrame, out_dir: Path, header: str, extra: dict[str, pd.DataFrame] | None = None) -> None:
    """bench.csv and bench.md (the header above the table), and any ``extra`` CSVs by file name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "bench.csv", index=False)
    (out_dir / "bench.md").write_text(f"{header}\n\n{table.to_markdown(index=False)}\n", encoding="utf-8")
    for name, frame in (extra or {}).items():
        frame.to_csv(out_dir / name, index=False)


def workload_tokenizer(loaded: LoadedModel, tokenizer: str | None):
    """The tokenizer building the workload's prompts: the one asked for, the model's, or the embedded SmolLM2's
    (a random-weight model has none; prompt lengths then follow that tokenizer, not the model's own)."""
    from transformers import AutoTokenizer

    if tokenizer is None and loaded.tokenizer is not None:
        return loaded.tokenizer
    source = tokenizer or resolve_model_source(None).location
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a missing or bad tokenizer
        raise KvbenchError(f"cannot load tokenizer {source!r}: {error_line(error)}") from None


def bench_batch_invariant(requested: bool | None, model: str | None, device: str) -> bool:
    """--batch-invariant resolved as `kvbench run` resolves it (before the weights load)."""
    check_batch_invariant_device(requested, resolve_device(device))
    if model in MODEL_SHAPES:
        model_type = MODEL_SHAPES[model]["model_type"]
    else:
        model_type = getattr(load_model_config(resolve_model_source(model)), "model_type", None)
    return resolve_batch_invariant(requested, resolve_device(device), model_type)


def load_bench_model(model: str | None, dtype: str, attn: str, device: str) -> LoadedModel:
    if model in MODEL_SHAPES:
        return random_weight_model(model, dtype, device, attn)
    return load_model(model, dtype=dtype, attn=attn, device=device)


# -- the decode step at several batch sizes ------------------------------------------------------------


def run_decode_step_bench(loaded: LoadedModel, batch_sizes: list[int], cache_tokens: int, steps: int, rounds: int,
                          progress=print, kernels: tuple[bool, ...] = (False,), eager: bool = True) -> pd.DataFrame:
    """Milliseconds per decode step of ``batch_sizes`` rows, each holding ``cache_tokens`` per layer, with the
    step captured as a CUDA graph and (with ``eager``) run eagerly, by each of ``kernels`` (batch-invariant or
    not), all alternated within each round; the first round is discarded."""
    model = loaded.model
    kept = synthetic_cache(model, cache_tokens)
    modes = ([True] + ([False] if eager else [])) if model.device.type == "cuda" else [False]
    batches = {}
    for rows in batch_sizes:
        for graphs in modes:
            for invariant in kernels:
                batch = synthetic_batch(model, rows, kept, steps * rounds + 2, use_cuda_graphs=graphs,
                                        batch_invariant=invariant)
                batches[rows, graphs, invariant] = batch
    timings: dict[tuple[int, bool, bool], list[float]] = {key: [] for key in batches}
    for round_index in range(rounds):
        for key, batch in batches.items():
            seconds = []
            for _ in range(steps):
                start = time.perf_counter()
                batch.step()
                seconds.append(time.perf_counter() - start)
            if round_index > 0:
                timings[key] += seconds
            progress(f"round {round_index + 1}/{rounds}: {key[0]} rows, {'CUDA graph' if key[1] else 'eager'}"
                     f"{', batch-invariant' if key[2] else ''}: {statistics.median(seconds) * 1e3:.2f} ms/step")
    rows_out = []
    for (rows, graphs, invariant), seconds in timings.items():
        step_ms = statistics.median(seconds) * 1e3
        rows_out.append({"batch": rows, "cuda_graph": graphs, "batch_invariant": invariant, "cache_tokens": cache_tokens,
                         "step_ms": round(step_ms, 2), "ms_per_sample_token": round(step_ms / rows, 3),
                         "steps_timed": len(seconds),
                         "graph_fell_back": graphs and not batches[rows, graphs, invariant].use_cuda_graphs})
    return pd.DataFrame(rows_out)


# -- the LongBench workload ------------------------------------------------------------------------------

#: samples per task in full LongBench v1 (4,750 in all), for the projection
LONGBENCH_V1_SAMPLES = {task: 200 for task in LONGBENCH_TASKS} | {"multifieldqa_en": 150, "lcc": 500, "repobench-p": 500}


def longbench_requests(tokenizer, data_dir: str, limit: int | None, context_window: int,
                       max_length: int | None) -> list[DecodeRequest]:
    """Every task's samples as `kvbench run` prompts them (template, middle truncation, chat template) and in the
    order it takes them (`longest_generations_first`), each decoding its task's whole generation length: no stop
    token, so the work does not depend on the weights."""
    requests = []
    for task in build_tasks("longbench"):
        budget = max_prompt_length(context_window, task, max_length)
        for sample in task.load_samples(data_dir)[:limit]:
            requests.append(sample_request(task, sample, tokenizer, budget, set(), tag=(task.name, sample["_id"])))
    return longest_generations_first(requests, lambda request: request.max_new_tokens)


def run_longbench_workload(loaded: LoadedModel, tokenizer, method_specs: list[str], capacity: int, data_dir: str,
                           batch_size: int, limit: int | None = None, alone_limit: int | None = 1,
                           max_length: int | None = None, progress=print,
                           alone_eager: bool = False, batch_invariant: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Throughput of the run loop's engine over LongBench-shaped work, each method alone (batch 1, on the
    first ``alone_limit`` samples of each task; with ``alone_eager`` also without CUDA graphs, as kvbench
    decoded before batching) and batched (all samples), in one process.

    Returns the summary table and the per-sample table (tokens of both modes, for the identical fraction).
    """
    model = loaded.model
    all_requests = longbench_requests(tokenizer, data_dir, limit, loaded.context_window, max_length)
    alone_requests = first_of_each_task(all_requests, alone_limit)
    methods = {spec: method.prepare(loaded.info) for spec, method in bench_methods(method_specs, capacity).items()}
    # Warm-up: kernels, allocator, autotuning and CUDA graphs of the common batch sizes before timing.
    for compressor in methods.values():
        list(generate_stream(model, compressor, all_requests[: min(4, len(all_requests))], batch_size,
                             batch_invariant=batch_invariant))
    summary, samples = [], []
    for spec, compressor in methods.items():
        results = {}
        modes = [("batch 1", alone_requests, 1, True)]
        if alone_eager:
            modes.append(("batch 1, eager", alone_requests, 1, False))
        modes.append((f"batch {batch_size}", all_requests, batch_size, True))
        for mode, requests, rows, graphs in modes:
            synchronize(model.device)
            start = time.perf_counter()
            generations = list(generate_stream(model, compressor, requests, rows, use_cuda_graphs=graphs,
                                               batch_invariant=batch_invariant))
            seconds = time.perf_counter() - start
            results[mode] = {g.tag: g for g in generations}
            summary.append({**workload_row(spec, compressor, mode, rows, generations, seconds),
                            "batch_invariant": batch_invariant})
            progress(", ".join(f"{key} {value}" for key, value in summary[-1].items()))
        alone, batched = results["batch 1"], results[f"batch {batch_size}"]
        for tag, generation in alone.items():
            samples.append({"method": spec, "task": tag[0], "_id": tag[1], "prompt_tokens": generation.prompt_tokens,
                            "identical": generation.token_ids == batched[tag].token_ids,
                            "first_difference": first_difference(generation.token_ids, batched[tag].token_ids)})
    table = pd.DataFrame(summary)
    identical = pd.DataFrame(samples).groupby("method")["identical"].mean().round(4)
    table["identical_to_batch_1"] = table["method"].map(identical)
    return table, pd.DataFrame(samples)


def first_of_each_task(requests: list[DecodeRequest], count: int | None) -> list[DecodeRequest]:
    """The first ``count`` requests of each task (all of them for None), in order."""
    taken: dict[str, int] = {}
    chosen = []
    for request in requests:
        task = request.tag[0]
        if count is None or taken.get(task, 0) < count:
            taken[task] = taken.get(task, 0) + 1
            chosen.append(request)
    return chosen


def grid_configurations(method_specs: list[str], capacities: list[int]) -> dict[str, object]:
    """Run-folder label -> configured method, for every method spec at every capacity (once for a method
    without one), in the order given."""
    configurations = {}
    for spec in method_specs:
        for capacity in capacities:
            method = bench_methods([spec], capacity)[spec]
            configurations.setdefault(method_label(method), method)
    return configurations


def run_longbench_grid(loaded: LoadedModel, tokenizer, method_specs: list[str], capacities: list[int], data_dir: str,
                       batch_size: int | None, limit: int | None = None, separate_limit: int | None = 1,
                       max_length: int | None = None, progress=print,
                       batch_invariant: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A grid of configurations over LongBench-shaped work, as `kvbench run` runs it (each sample prefilled once
    for every configuration, their rows decoded together, by the kernels ``batch_invariant`` chooses), beside
    the configurations run one by one on the first ``separate_limit`` samples of each task (0: not run), in one
    process. Per configuration and for the grid:
    samples per hour and the full LongBench v1 projected in hours. A configuration's share of the shared run
    is its measured cost (prefill share plus decode share) over the run's.

    Returns the summary table and, per configuration and sample run both ways, whether the tokens agree."""
    model = loaded.model
    rows = batch_size or auto_batch_size(model, batch_invariant)
    shared: dict = {}
    labels, compressors = [], []
    for label, method in grid_configurations(method_specs, capacities).items():
        labels.append(label)
        compressors.append(method.prepare(loaded.info, shared))
    everyone = tuple(range(len(compressors)))
    all_requests = [replace(request, configurations=everyone)
                    for request in longbench_requests(tokenizer, data_dir, limit, loaded.context_window, max_length)]
    separate_requests = first_of_each_task(all_requests, separate_limit)
    progress(f"{len(compressors)} configurations, {len(all_requests)} samples, decode batch {rows}")
    # warm-up: kernels, allocator, graphs
    list(generate_stream(model, compressors, all_requests[:2], rows, batch_invariant=batch_invariant))
    summary = []
    synchronize(model.device)
    start = time.perf_counter()
    stats = StreamStats()
    generations = list(generate_stream(model, compressors, all_requests, rows, say=progress,
                                       batch_invariant=batch_invariant, stats=stats))
    seconds = time.perf_counter() - start
    by_configuration = [[g for g in generations if g.configuration == index] for index in everyone]
    costs = [sum(g.prefill_cost_seconds + g.decode_cost_seconds for g in gens) for gens in by_configuration]
    for label, compressor, gens, cost in zip(labels, compressors, by_configuration, costs):
        summary.append(workload_row(label, compressor, "shared prefill", rows, gens, seconds * cost / sum(costs)))
    summary.append(_grid_total(model, "shared prefill", rows, summary[-len(compressors):], generations, seconds)
                   | stream_figures(stats))
    progress(", ".join(f"{key} {value}" for key, value in summary[-1].items()))
    if not separate_limit:
        return pd.DataFrame(summary), pd.DataFrame(columns=["method", "task", "_id", "identical", "first_difference"])
    shared_tokens = {(g.configuration, g.tag): g.token_ids for g in generations}
    agreement = []
    separate_rows = []
    requests = [replace(request, configurations=(0,)) for request in separate_requests]
    for index, (label, compressor) in enumerate(zip(labels, compressors)):
        synchronize(model.device)
        start = time.perf_counter()
        gens = list(generate_stream(model, compressor, requests, rows, batch_invariant=batch_invariant))
        separate_rows.append(workload_row(label, compressor, "one by one", rows, gens, time.perf_counter() - start))
        progress(", ".join(f"{key} {value}" for key, value in separate_rows[-1].items()))
        agreement += [{"method": label, "task": g.tag[0], "_id": g.tag[1],
                       "identical": g.token_ids == shared_tokens[index, g.tag],
                       "first_difference": first_difference(g.token_ids, shared_tokens[index, g.tag])} for g in gens]
    summary += separate_rows
    summary.append(_grid_total(model, "one by one", rows, separate_rows, None, sum(row["seconds"] for row in separate_rows)))
    table = pd.DataFrame(summary)
    identical = pd.DataFrame(agreement).groupby("method")["identical"].mean().round(4)
    table["identical_shared_vs_one_by_one"] = table["method"].map(identical)
    return table, pd.DataFrame(agreement)


def _grid_total(model, mode: str, rows: int, configuration_rows: list[dict], generations: list[Generation] | None,
                seconds: float) -> dict:
    """The whole grid's row: every configuration's samples over the time they took together; projected hours
    summed over the configurations (each projected from its own tasks' costs)."""
    samples = sum(row["samples"] for row in configuration_rows)
    total = {"method": f"all {len(configuration_rows)} configurations", "capacity": None, "mode": mode,
             "batch_size": rows, "samples": samples, "seconds": round(seconds, 1),
             "samples_per_hour": round(samples / seconds * 3600),
             "projected_longbench_v1_hours": round(sum(row["projected_longbench_v1_hours"] or 0
                                                       for row in configuration_rows), 2)}
    if generations is not None:
        # each shared prefill counted once
        prefills = {g.tag: (g.prompt_tokens, g.prefill_seconds) for g in generations}
        prefill_seconds = sum(prefill for _, prefill in prefills.values())
        tflops, mfu = prefill_utilisation(model, [tokens for tokens, _ in prefills.values()], prefill_seconds)
        total.update({"prefill_share": round(prefill_seconds / seconds, 3), "prefill_tflops": round(tflops, 1),
                      "prefill_mfu": None if mfu is None else round(mfu, 3),
                      "decode_tokens_per_s": round(sum(len(g.token_ids) - 1 for g in generations)
                                                   / max(seconds - prefill_seconds, 1e-9), 1)})
        peaks = [g.peak_memory_bytes for g in generations if g.peak_memory_bytes is not None]
        total["peak_memory_gib"] = round(max(peaks) / 2**30, 2) if peaks else None
    return total


def stream_figures(stats: StreamStats) -> dict:
    """Where the stream's time went: prefills, admitting caches into rows, decode steps (of which CUDA graph
    captures, and how many ran during prefills, beside them on the device), how many rows a step ran on average,
    and the wall time of a step outside the prefills."""
    outside = stats.steps - stats.steps_in_prefill
    return {"admit_s": round(stats.admit_seconds, 2), "step_s": round(stats.step_seconds, 2),
            "capture_s": round(stats.capture_seconds, 2), "captures": stats.captures, "decode_steps": stats.steps,
            "steps_in_prefill": stats.steps_in_prefill, "rows_per_step": round(stats.row_steps / max(stats.steps, 1), 1),
            "step_ms": round(stats.step_seconds / max(outside, 1) * 1e3, 2)}


def first_difference(first: list[int], second: list[int]) -> int | None:
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b),
                None if len(first) == len(second) else min(len(first), len(second)))


def workload_row(spec: str, compressor, mode: str, rows: int, generations: list[Generation], seconds: float) -> dict:
    """Throughput figures of one mode, and the full LongBench v1 projected from each task's measured cost."""
    prefill = sum(g.prefill_cost_seconds for g in generations)
    decode_tokens = sum(len(g.token_ids) - 1 for g in generations)
    cost_by_task: dict[str, list[float]] = {}
    for g in generations:
        cost_by_task.setdefault(g.tag[0], []).append(g.prefill_cost_seconds + g.decode_cost_seconds)
    measured_cost = sum(sum(costs) for costs in cost_by_task.values())
    full_cost = sum(LONGBENCH_V1_SAMPLES[task] * statistics.mean(costs) for task, costs in cost_by_task.items())
    # time not attributed to a sample (scheduling, tokenizing) scales with the work
    projected_hours = full_cost * (seconds / measured_cost) / 3600 if measured_cost else None
    peaks = [g.peak_memory_bytes for g in generations if g.peak_memory_bytes is not None]
    return {
        "method": spec, "capacity": compressor.method.budget, "mode": mode, "batch_size": rows,
        "samples": len(generations), "seconds": round(seconds, 1),
        "samples_per_hour": round(len(generations) / seconds * 3600),
        "decode_tokens_per_s": round(decode_tokens / max(seconds - prefill, 1e-9), 1),
        "prefill_share": round(prefill / seconds, 3),
        "peak_memory_gib": round(max(peaks) / 2**30, 2) if peaks else None,
        # four decimals: a grid's total sums its configurations' hours (29 of 0.0496 h each, rounded to two
        # decimals, summed to 1.45 h instead of 1.44 h, and hid a 6 % change between two runs)
        "projected_longbench_v1_hours": None if projected_hours is None else round(projected_hours, 4),
        "tasks_covered": len(cost_by_task),
    }

