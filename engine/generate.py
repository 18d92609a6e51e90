"""Greedy generation with compressed caches, many samples at once (continuous batching).

Each sample is prefilled alone and compressed layer by layer (`kvbench.engine.prefill`),
once for every configuration of a grid that needs it; each configuration's cache then
takes a free row of the decode batch (`kvbench.engine.decode`), so rows of different
methods and capacities decode side by side. A row that reaches a stop token or its
generation length leaves at once, and the next waiting cache takes its place, so no step
is spent on finished rows. Results come out as rows finish. The next sample is prefilled
only once every cache of the previous one holds a row, so at most one sample's caches
wait outside the batch.

Out of GPU memory with several rows, the batch is halved (said once) and the rows that no
longer fit are redone later; nothing finished is lost and nothing is produced twice. Out of
memory with a sample alone is one error line naming the sample and its prompt length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvbench.errors import KvbenchError
from kvbench.engine.chunked import DEFAULT_CHUNK_TOKENS
from kvbench.engine.decode import DecodeBatch, FinishedRow
from kvbench.engine.prefill import DecodeRequest, Prefilled, prefill_shared
from kvbench.methods.base import Compressor, Method, ModelInfo

#: free memory kept aside when growing the decode buffers, for the next prefill's activations
GROWTH_MARGIN = 1.25
#: samples decoded together by default: on CUDA a step costs nearly the same for 1 or 32 rows (it reads
#: the weights once); on CPU more rows soon cost proportionally more (see the README's measurements)
DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 4}


def default_batch_size(model) -> int:
    return DEFAULT_BATCH_SIZE.get(model.get_input_embeddings().weight.device.type, 1)


@dataclass
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    #: cache length of each layer right after prefill (= prompt length where nothing was dropped)
    kept_per_layer: list[int]
    #: the sample's prefill, shared by every configuration that needed it
    prefill_seconds: float
    #: this configuration's share of the prefill (``prefill_seconds`` over the configurations sharing it)
    prefill_cost_seconds: float
    #: from joining the decode batch to the last token (the sample's decoding latency)
    decode_seconds: float
    #: the sample's share of the decode steps it took part in (step time / rows in the step)
    decode_cost_seconds: float
    #: bytes of keys/values kept after prefill
    kv_cache_bytes: int
    #: peak accelerator memory of the prefill (None on CPU)
    peak_memory_bytes: int | None
    #: what the method reports about the sample (its record)
    method_record: dict
    #: the request's tag, given back
    tag: Any = None
    #: index of the compressor (the grid's configuration) that made it
    configuration: int = 0


def model_info(model) -> ModelInfo:
    """What a method may know of a model loaded without kvbench's loader (tests, `bench`'s random weights)."""
    name = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/").rsplit("/", 1)[-1]
    return ModelInfo(name or "model", model.config.num_hidden_layers)


def as_compressor(method: Method | Compressor, model) -> Compressor:
    """A compressor for ``model``: ``method`` itself when already bound, else the method prepared for it."""
    return method if isinstance(method, Compressor) else method.prepare(model_info(model))


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """Every token id that ends generation: the generation config's, and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _generation(prefilled: Prefilled, tokens: list[int], decode_seconds: float, decode_cost: float) -> Generation:
    return Generation(tokens, len(prefilled.request.prompt_ids), prefilled.kept_per_layer, prefilled.prefill_seconds,
                      prefilled.prefill_cost_seconds, decode_seconds, decode_cost, prefilled.kv_cache_bytes,
                      prefilled.peak_memory_bytes, prefilled.state.record(), prefilled.request.tag,
                      prefilled.configuration)


def _describe(request: DecodeRequest) -> str:
    sample = request.sample or {}
    name = f"{sample.get('task', '')} sample {sample.get('_id', '?')}".strip()
    return f"{name} ({len(request.prompt_ids)} prompt tokens)"


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


def generate_stream(model, methods: Method | Compressor | Sequence[Method | Compressor],
                    requests: Iterable[DecodeRequest], batch_size: int = 1,
                    say: Callable[[str], None] | None = None, use_cuda_graphs: bool = True,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[Generation]:
    """Generate for every request and each configuration it names (``request.configurations``: indices into
    ``methods``, a single method standing for a list of one), up to ``batch_size`` rows decoded together;
    yields each row as it finishes. Prefills run their per-token modules in chunks of ``chunk_tokens`` positions."""
    single = isinstance(methods, (Method, Compressor))
    compressors = [as_compressor(method, model) for method in ([methods] if single else methods)]
    batch = DecodeBatch(model, batch_size, use_cuda_graphs=use_cuda_graphs)
    source = iter(requests)
    redo: deque[DecodeRequest] = deque()
    #: caches of the last prefilled sample still waiting for a row
    waiting: deque[Prefilled] = deque()
    exhausted = False
    halving_said = False

    def next_request() -> DecodeRequest | None:
        nonlocal exhausted
        if redo:
            return redo.popleft()
        if exhausted:
            return None
        request = next(source, None)
        exhausted = request is None
        return request

    def unfinished(prefilled: list[Prefilled]) -> DecodeRequest:
        """A sample's request for the configurations of ``prefilled`` only (to be prefilled again)."""
        return replace(prefilled[0].request, configurations=tuple(one.configuration for one in prefilled))

    def halve(request_in_hand: DecodeRequest | None) -> None:
        """Out of memory with several rows: keep half of them; the rest (and the request in hand) are redone."""
        nonlocal halving_said
        rows = max(1, len(batch.rows) // 2)
        if not halving_said and say is not None:
            say(f"out of GPU memory with {len(batch.rows)} decode rows: continuing with {rows}")
            halving_said = True
        requeued = [unfinished([prefilled]) for prefilled in batch.requeue_rows_from(rows)]
        batch.shrink(rows)
        redo.extendleft(reversed(([request_in_hand] if request_in_hand is not None else []) + requeued))
        torch.cuda.empty_cache()

    while True:
        while batch.free_row() is not None:
            if not waiting:
                request = next_request()
                if request is None:
                    break
                try:
                    prefilled = prefill_shared(model, compressors, request, chunk_tokens)
                except Exception as error:
                    if not _out_of_memory(error):
                        raise
                    if not batch.active_rows:
                        raise KvbenchError(f"out of GPU memory prefilling {_describe(request)} alone") from None
                    halve(request)
                    continue
                for one in prefilled:
                    if one.finished:
                        yield _generation(one, [one.first_token], 0.0, 0.0)
                    else:
                        waiting.append(one)
                continue
            if batch.active_rows and not _fits(batch, waiting[0]):
                break  # wait for rows to finish before growing the buffers
            try:
                batch.admit(waiting[0])
                waiting.popleft()
            except Exception as error:
                if not _out_of_memory(error):
                    raise
                if not batch.active_rows:
                    raise KvbenchError(f"out of GPU memory decoding {_describe(waiting[0].request)} alone") from None
                request = unfinished(list(waiting))
                waiting.clear()
                halve(request)
        if not batch.active_rows:
            if not waiting and exhausted and not redo:
                return
            continue
        try:
            finished: list[FinishedRow] = batch.step()
        except Exception as error:
            if not _out_of_memory(error) or len(batch.rows) == 1:
                raise
            halve(None)
            continue
        for row in finished:
            yield _generation(row.prefilled, row.tokens, row.decode_seconds, row.decode_cost_seconds)
        if not waiting and exhausted and not redo:
            batch.compact()  # draining: the remaining rows move down, so steps run on a smaller bucket


def _fits(batch: DecodeBatch, prefilled: Prefilled) -> bool:
    """Whether the GPU has room to grow the decode buffers for this sample (always, on CPU)."""
    growth = batch.growth_bytes(prefilled)
    if growth == 0 or batch.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(batch.device)
    reusable = torch.cuda.memory_reserved(batch.device) - torch.cuda.memory_allocated(batch.device)
    return (free + reusable) > growth * GROWTH_MARGIN


def generate_greedy(model, prompt_ids, method: Method | Compressor, max_new_tokens: int, eos_token_ids: set[int],
                    sample: dict | None = None) -> Generation:
    """One sample, alone: prefill, compress layer by layer, decode greedily at the original positions."""
    request = DecodeRequest(list(prompt_ids), max_new_tokens, set(eos_token_ids), sample)
    return next(generate_stream(model, method, [request], batch_size=1))
