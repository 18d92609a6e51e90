"""One sample's prefill: the prompt through the model at batch 1, compressed layer by layer.

Prompts differ in length and prefill is compute-bound, so each sample is prefilled alone;
its compressed cache then joins a decode batch (`kvbench.engine.decode`). Logits are
computed for the last prompt position only.

One prefill serves every configuration (method, capacity, options) of a grid that needs
the sample: the forward pass (and, question-aware, the first generated token) does not
depend on the method, since each method compresses a layer only after that layer's full
attention ran. Each
configuration's state sees the same layers and keeps its own selection; the scoring
pre-pass runs once, for the configurations that need it. The caches of all of them
exist together until they join the decode batch: at most the prompt (a full cache) plus
the sum of the compressed budgets, per layer.

A request with a ``question_start`` (question-agnostic runs) is compressed without its
question: the prompt's tokens before it are prefilled (once for all configurations) and
compressed, then the question's tokens run over each configuration's compressed cache
(`kvbench.engine.extend`) and stay in it whole. The first token comes from that extend, so
it may differ by configuration.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.engine.chunked import DEFAULT_CHUNK_TOKENS, install_chunking
from kvbench.engine.extend import extend
from kvbench.engine.hook import HOOKED_PREFIX, PrefillSession, active, install_hook
from kvbench.engine.invariant import has_kernel_rms_norms, kernel_rms_norms
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
    #: the configurations (indices into the generation's compressors) that need this sample, all from one prefill
    configurations: tuple[int, ...] = (0,)
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
    #: the configuration's share of the prefill: the shared forward pass over the configurations that shared it,
    #: plus its own extend (question-agnostic)
    prefill_cost_seconds: float
    kv_cache_bytes: int
    #: peak accelerator memory of the prefill (None on CPU)
    peak_memory_bytes: int | None
    #: which of the generation's compressors made it
    configuration: int = 0
    #: per layer, per decode step, the logical cache index evicted before that step (-1: none); None: no eviction
    evictions: list[list[int]] | None = field(default=None)

    @property
    def finished(self) -> bool:
        """The first token already ends the generation: nothing to decode."""
        request = self.request
        return self.first_token in request.stop_ids or request.max_new_tokens <= 1


#: SDPA kernels the prefill may use on CUDA, in the order tried (a kernel that cannot take the inputs passes them
#: on): in plain transformers on one H200, cuDNN's prefilled 32k tokens in 1.38 s against 1.72 s for flash
CUDA_PREFILL_SDPA_KERNELS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _orders_sdpa_kernels(model) -> bool:
    """Whether the prefill picks SDPA's kernel by `CUDA_PREFILL_SDPA_KERNELS`: sdpa on CUDA, torch >= 2.6."""
    from torch.nn.attention import sdpa_kernel

    backend = model.config._attn_implementation.removeprefix(HOOKED_PREFIX)
    return (backend == "sdpa" and model.get_input_embeddings().weight.device.type == "cuda"
            and "set_priority" in inspect.signature(sdpa_kernel).parameters)


def prefill_attention_kernels(model) -> str:
    """The prefill's attention as run.json records it: the backend, and on CUDA with sdpa the kernel order."""
    if not _orders_sdpa_kernels(model):
        return model.config._attn_implementation.removeprefix(HOOKED_PREFIX)
    return f"sdpa: {' > '.join(kernel.removesuffix('_ATTENTION').lower() for kernel in CUDA_PREFILL_SDPA_KERNELS)}"


def _prefill_attention(model):
    """The context choosing the prefill's SDPA kernels (`prefill_attention_kernels`); none elsewhere."""
    if not _orders_sdpa_kernels(model):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, kernel) for kernel in CUDA_PREFILL_SDPA_KERNELS], set_priority=True)


def _kernel_norms_apply(model) -> bool:
    """Whether the prefill's RMSNorms run kvbench's kernel (`kernel_rms_norms`): on CUDA, for the families it knows.
    At 6.5k tokens of Llama-3-8B on an H100 the model's own RMSNorms took about a tenth of the prefill."""
    return _triton_on_cuda(model) and has_kernel_rms_norms(model)


def _kernel_elementwise_applies(model) -> bool:
    """Whether the prefill's rotary embedding or MLP gate run kvbench's kernels (`kvbench.engine.elementwise`, the
    model's roundings): on CUDA, for the families and dtypes they take."""
    return bool(_kernel_elementwise_parts(model))


def _kernel_elementwise_parts(model) -> list[str]:
    if not _triton_on_cuda(model):
        return []
    from kvbench.engine.elementwise import kernel_elementwise_parts

    return kernel_elementwise_parts(model)


def _triton_on_cuda(model) -> bool:
    return model.get_input_embeddings().weight.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def prefill_kernels(model) -> dict[str, str]:
    """The prefill's kernels as run.json records them (they change rounding only, like the device): attention's,
    fastest first, and which of its RMSNorms, rotary embedding and MLP gate kvbench's kernels run."""
    elementwise = _kernel_elementwise_parts(model)
    return {"prefill_attention": prefill_attention_kernels(model),
            "prefill_rms_norm": "kvbench triton kernel" if _kernel_norms_apply(model) else "model",
            "prefill_elementwise": f"kvbench triton kernels: {', '.join(elementwise)}" if elementwise else "model"}


def _prefill_kernels(model):
    """The prefill's kernel choices: its SDPA kernels, its RMSNorms, its rotary embedding and MLP gate."""
    stack = contextlib.ExitStack()
    stack.enter_context(_prefill_attention(model))
    if _kernel_norms_apply(model):
        stack.enter_context(kernel_rms_norms(model))
    if _kernel_elementwise_applies(model):
        from kvbench.engine.elementwise import kernel_elementwise

        stack.enter_context(kernel_elementwise(model))
    return stack


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (not for a decode step running beside it on its own)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


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


def prefill(model, compressor: Compressor, request: DecodeRequest,
            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Prefilled:
    """Prefill one prompt for one configuration (see `prefill_shared`)."""
    return prefill_shared(model, [compressor], request, chunk_tokens)[0]


@torch.inference_mode()
def prefill_shared(model, compressors: Sequence[Compressor], request: DecodeRequest,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   between_layers: Callable[[], None] | None = None) -> list[Prefilled]:
    """Prefill one prompt through the hook once for the configurations ``request.configurations`` names
    (indices into ``compressors``); each keeps what it chooses of each layer (of the tokens before
    ``request.question_start``, the question then extending each configuration's compressed cache, and
    giving each its own first token). The per-token modules run in chunks of ``chunk_tokens`` positions
    (`kvbench.engine.chunked`). ``between_layers`` is called after each layer (`PrefillSession`)."""
    install_hook(model)
    install_chunking(model, chunk_tokens)
    device = model.get_input_embeddings().weight.device
    prompt_length = len(request.prompt_ids)
    compressed_length = prompt_length if request.question_start is None else request.question_start
    if not 0 < compressed_length <= prompt_length:
        raise ValueError(f"question_start must be inside the prompt (1 to {prompt_length}), got {compressed_length}")
    input_ids = torch.as_tensor(request.prompt_ids[:compressed_length], dtype=torch.long, device=device).view(1, -1)
    num_layers = model.config.num_hidden_layers
    states = [compressors[index].start_sample(compressed_length, request.sample) for index in request.configurations]
    positions = torch.arange(compressed_length, device=device).view(1, -1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with _prefill_kernels(model):
        if any(state.needs_scoring_pass for state in states):
            # Per-layer budgets that depend on every layer's scores (PrefixKV online) need them before the
            # first layer is compressed: one prefill that only scores, nothing kept.
            with active(model, PrefillSession(states, num_layers, observing=True, between_layers=between_layers)):
                model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1)
        session = PrefillSession(states, num_layers, between_layers=between_layers)
        with active(model, session):
            logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1).logits[0, -1]
    for kept in session.kept:
        if any(layer is None for layer in kept):
            raise RuntimeError(f"the hook saw {sum(layer is not None for layer in kept)} of {num_layers} attention layers")
    # per configuration: its cache, its first token, and the seconds spent on it alone (its extend)
    caches: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], int, float]]
    if compressed_length == prompt_length:
        first_token = int(logits.argmax())  # synchronizes
        shared_seconds = prefill_seconds = time.perf_counter() - start
        caches = [(kept, first_token, 0.0) for kept in session.kept]
    else:
        # The question extends each configuration's own compressed cache: what it attends to differs by
        # configuration, and so may the first token.
        synchronize(device)
        shared_seconds = time.perf_counter() - start
        question_ids = request.prompt_ids[compressed_length:]
        caches = []
        for state, kept in zip(states, session.kept):
            extend_start = time.perf_counter()
            extended, question_logits = extend(model, kept, question_ids, compressed_length)
            state.prompt_extended(len(question_ids))
            first_token = int(question_logits.argmax())  # synchronizes
            caches.append((extended, first_token, time.perf_counter() - extend_start))
        prefill_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    prefilled = []
    for configuration, state, (kept, first_token, own_seconds) in zip(request.configurations, states, caches):
        kept_per_layer = [keys.shape[-2] for keys, _ in kept]
        kv_bytes = sum(keys.nbytes + values.nbytes for keys, values in kept)
        one = Prefilled(request, state, kept, kept_per_layer, first_token, prefill_seconds,
                        shared_seconds / len(states) + own_seconds, kv_bytes, peak, configuration)
        if not one.finished:
            one.evictions = eviction_schedule(state, kept_per_layer, prompt_length, request.max_new_tokens - 1)
        prefilled.append(one)
    return prefilled
