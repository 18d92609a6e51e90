"""Speed and memory of methods side by side: `kvbench bench`, one call, one table.

Builds the model once (a real checkpoint, or a random-weight model of a known
shape such as Llama-3-8B, where weight values do not matter for timing), then,
for each prompt length, runs every method ``repeats`` times round-robin (so a
drifting clock hits all methods alike) and reports medians: prefill seconds,
decode milliseconds per token, peak accelerator memory, and the KV cache kept.
The decode figure is put next to the memory-bandwidth bound of reading the
weights and the cache once per token, where the device's bandwidth is known.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import torch

from kvbench.errors import KvbenchError
from kvbench.harness.generate import generate_greedy
from kvbench.harness.model import LoadedModel, check_attention_backend, load_model, resolve_device, resolve_dtype
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
              new_tokens: int, repeats: int, progress=print) -> pd.DataFrame:
    model = loaded.model
    vocab = model.config.vocab_size
    methods = {spec: method.prepare(loaded.info) for spec, method in bench_methods(method_specs, capacity).items()}
    generator = torch.Generator().manual_seed(0)
    # Warm-up: kernels, allocator and autotuning before anything is timed.
    warm_prompt = torch.randint(0, vocab, (min(lengths),), generator=generator).tolist()
    for method in methods.values():
        generate_greedy(model, warm_prompt, method, 2, set())
    rows = []
    for length in lengths:
        prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
        samples = {spec: [] for spec in methods}
        for repeat in range(repeats):
            for spec, method in methods.items():
                # No EOS: every run decodes exactly `new_tokens`, so decode times compare.
                generation = generate_greedy(model, prompt, method, new_tokens, set(),
                                             sample={"task": "bench", "prompt_text": ""})
                samples[spec].append(generation)
                progress(f"length {length} {spec} repeat {repeat + 1}/{repeats}: "
                         f"prefill {generation.prefill_seconds:.3f}s")
        for spec, generations in samples.items():
            kv_bytes = generations[0].kv_cache_bytes
            decode_ms = statistics.median(g.decode_seconds / max(len(g.token_ids) - 1, 1) for g in generations) * 1e3
            peak = [g.peak_memory_bytes for g in generations]
            bound = decode_bound_ms(model, kv_bytes)
            rows.append({
                "prompt_tokens": length,
                "method": spec,
                "capacity": methods[spec].method.budget,
                "prefill_s": round(statistics.median(g.prefill_seconds for g in generations), 4),
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


def write_bench(table: pd.DataFrame, out_dir: Path, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "bench.csv", index=False)
    (out_dir / "bench.md").write_text(f"{header}\n\n{table.to_markdown(index=False)}\n", encoding="utf-8")


def load_bench_model(model: str | None, dtype: str, attn: str, device: str) -> LoadedModel:
    if model in MODEL_SHAPES:
        return random_weight_model(model, dtype, device, attn)
    return load_model(model, dtype=dtype, attn=attn, device=device)
