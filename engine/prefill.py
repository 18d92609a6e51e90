"""One sample's prefill: the prompt through the model at batch 1, compressed layer by layer.

Prompts differ in length and prefill is compute-bound, so each sample is prefilled alone;
its compressed cache then joins a decode batch (`kvbench.engine.decode`). Logits are
computed for the last prompt position only.

A request with a ``question_start`` (question-agnostic runs) is compressed without its
question: the prompt's tokens before it are prefilled and compressed, then the question's
tokens run over the compressed cache (`kvbench.engine.extend`) and stay in it whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.engine.chunked import DEFAULT_CHUNK_TOKENS, install_chunking
from kvbench.engine.extend import extend
from kvbench.engine.hook import PrefillSession, active, install_hook
from kvbench.methods.base import Compressor, SampleCompression


@dataclass
class DecodeRequest:
    """A prompt to generate from, and when to stop."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: set[int]
    #: what the method may read of the sample (its fields and ``prompt_text``)
    sample: dict | None = None
    #: anything the caller needs back with the result (its task and sample, say)
    tag: Any = None
    #: index of the question's first prompt token: the method compresses only the tokens before it, and the
    #: question joins the compressed cache whole (question-agnostic); None: the whole prompt is compressed
    question_start: int | None = None


@dataclass
class Prefilled:
    """A prefilled sample waiting for (or needing no) decoding."""

    request: DecodeRequest
    state: SampleCompression
    #: per layer, the kept (keys, values), each (1, num_kv_heads, kept, head_dim); released once admitted
    kept: list[tuple[torch.Tensor, torch.Tensor]] | None
    kept_per_layer: list[int]
    first_token: int
    prefill_seconds: float
    kv_cache_bytes: int
    #: peak accelerator memory of the prefill (None on CPU)
    peak_memory_bytes: int | None
    #: per layer, per decode step, the logical cache index evicted before that step (-1: none); None: no eviction
    evictions: list[list[int]] | None = field(default=None)

    @property
    def finished(self) -> bool:
        """The first token already ends the generation: nothing to decode."""
        request = self.request
        return self.first_token in request.stop_ids or request.max_new_tokens <= 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eviction_schedule(state: SampleCompression, kept_per_layer: list[int], prompt_length: int,
                      steps: int) -> list[list[int]] | None:
    """What ``state.decode_eviction`` answers before each of ``steps`` decode steps, per layer, as the cache
    evolves (one entry evicted when it answers, one token appended every step); None when it never evicts.

    Worked out once at admission, so that a decode step of a whole batch is a fixed sequence of
    tensor operations (capturable as a CUDA graph) instead of a Python call per row and layer.
    """
    if type(state).decode_eviction is SampleCompression.decode_eviction:
        return None
    schedule = []
    evicts = False
    for layer_idx, kept in enumerate(kept_per_layer):
        length = kept
        layer_schedule = []
        for step in range(steps):
            index = state.decode_eviction(layer_idx, length, prompt_length + step)
            if index is None:
                layer_schedule.append(-1)
            else:
                layer_schedule.append(index + length if index < 0 else index)
                length -= 1
                evicts = True
            length += 1
        schedule.append(layer_schedule)
    return schedule if evicts else None


@torch.inference_mode()
def prefill(model, compressor: Compressor, request: DecodeRequest,
            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Prefilled:
    """Prefill one prompt through the hook; the method keeps what it chooses of each layer (of the tokens
    before ``request.question_start``, the question then extending the compressed cache). The per-token
    modules run in chunks of ``chunk_tokens`` positions (`kvbench.engine.chunked`)."""
    install_hook(model)
    install_chunking(model, chunk_tokens)
    device = model.get_input_embeddings().weight.device
    prompt_length = len(request.prompt_ids)
    compressed_length = prompt_length if request.question_start is None else request.question_start
    if not 0 < compressed_length <= prompt_length:
        raise ValueError(f"question_start must be inside the prompt (1 to {prompt_length}), got {compressed_length}")
    input_ids = torch.as_tensor(request.prompt_ids[:compressed_length], dtype=torch.long, device=device).view(1, -1)
    num_layers = model.config.num_hidden_layers
    state = compressor.start_sample(compressed_length, request.sample)
    positions = torch.arange(compressed_length, device=device).view(1, -1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    if state.needs_scoring_pass:
        # Per-layer budgets that depend on every layer's scores (PrefixKV online) need them before the
        # first layer is compressed: one prefill that only scores, nothing kept.
        with active(model, PrefillSession(state, num_layers, observing=True)):
            model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1)
    session = PrefillSession(state, num_layers)
    with active(model, session):
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1).logits[0, -1]
    kept = session.kept
    if any(layer is None for layer in kept):
        raise RuntimeError(f"the hook saw {sum(layer is not None for layer in kept)} of {num_layers} attention layers")
    if compressed_length < prompt_length:
        kept, logits = extend(model, kept, request.prompt_ids[compressed_length:], compressed_length)
        state.prompt_extended(prompt_length - compressed_length)
    first_token = int(logits.argmax())  # synchronizes
    prefill_seconds = time.perf_counter() - start
    kept_per_layer = [keys.shape[-2] for keys, _ in kept]
    kv_bytes = sum(keys.nbytes + values.nbytes for keys, values in kept)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    prefilled = Prefilled(request, state, kept, kept_per_layer, first_token, prefill_seconds, kv_bytes, peak)
    if not prefilled.finished:
        prefilled.evictions = eviction_schedule(state, kept_per_layer, prompt_length, request.max_new_tokens - 1)
    return prefilled
