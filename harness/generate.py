"""Greedy decoding with the compression hook: prefill, compress layer by layer, decode."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from kvbench.harness.cache import CompressibleCache
from kvbench.harness.hook import CompressionSession, compression, install_hook
from kvbench.methods.base import Method


@dataclass
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    #: cache length of each layer right after prefill (= prompt length where nothing was dropped)
    kept_per_layer: list[int]
    prefill_seconds: float
    decode_seconds: float
    #: bytes of keys/values held after prefill
    kv_cache_bytes: int
    #: peak accelerator memory during the sample (None on CPU)
    peak_memory_bytes: int | None


def _cache_keyword(model) -> str:
    """Transformers renamed ``past_key_values`` to ``cache`` in the 5.x series; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """Every token id that ends generation: the generation config's, and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_greedy(
    model,
    prompt_ids,
    method: Method,
    max_new_tokens: int,
    eos_token_ids: set[int],
    sample: dict | None = None,
) -> Generation:
    """Decode greedily after compressing the prompt's cache with ``method``.

    Positions continue from the original prompt length, not from the shorter
    cache, so RoPE sees the same positions as without compression. Before every
    decoding step the method may evict one entry per layer (fixed-point methods).
    """
    install_hook(model)
    device = model.get_input_embeddings().weight.device
    input_ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
    prompt_length = input_ids.shape[1]
    num_layers = model.config.num_hidden_layers
    cache = CompressibleCache()
    cache_keyword = _cache_keyword(model)
    method.start_sample(prompt_length, num_layers, sample)
    session = CompressionSession(method, cache, num_layers, reserve=max_new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    positions = torch.arange(prompt_length, device=device).view(1, -1)
    _synchronize(device)
    start = time.perf_counter()
    if method.needs_scoring_pass:
        # Per-layer budgets that depend on every layer's scores (PrefixKV online) need them before the
        # first layer is compressed: one prefill that only scores, no cache kept.
        scoring = CompressionSession(method, cache, num_layers, reserve=0, observing=True)
        with compression(model, scoring):
            model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1)
    with compression(model, session):
        output = model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
        next_token = output.logits[0, -1].argmax()
        _synchronize(device)
        prefill_seconds = time.perf_counter() - start
        kept_per_layer = cache.layer_lengths()
        kv_cache_bytes = cache.nbytes()

        generated = [int(next_token)]
        start = time.perf_counter()
        for step in range(1, max_new_tokens):
            if generated[-1] in eos_token_ids:
                break
            tokens_seen = prompt_length + step - 1
            for layer_idx, layer in enumerate(cache.layers):
                evict = method.decode_eviction(layer_idx, layer.get_seq_length(), tokens_seen)
                if evict is not None:
                    layer.drop(evict)
            position = torch.tensor([[tokens_seen]], device=device)
            output = model(input_ids=next_token.view(1, 1), position_ids=position, use_cache=True, **{cache_keyword: cache})
            next_token = output.logits[0, -1].argmax()
            generated.append(int(next_token))
        _synchronize(device)
        decode_seconds = time.perf_counter() - start

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Generation(
        token_ids=generated,
        prompt_tokens=prompt_length,
        kept_per_layer=kept_per_layer,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        kv_cache_bytes=kv_cache_bytes,
        peak_memory_bytes=peak,
    )
