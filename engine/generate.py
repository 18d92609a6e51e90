"""Greedy generation with compressed caches, many samples at once (continuous batching).

Each sample is prefilled alone and compressed layer by layer (`kvbench.engine.prefill`),
once for every configuration of a grid that needs it; each configuration's cache then
takes a free row of the decode batch (`kvbench.engine.decode`), so rows of different
methods and capacities decode side by side. A row that reaches a stop token or its
generation length leaves at once, and the next waiting cache takes its place, so no step
is spent on finished rows. Results come out as rows finish. The next sample is prefilled
only once every cache of the previous one holds a row, so at most one sample's caches
wait outside the batch. A row takes the pages of the batch's pool its cache needs, so a
grid's compressed rows and its full-cache rows decode in one batch, each costing its own
memory; on CUDA the pool grows within free memory (less the next prefill's room), and
caches wait for rows to finish when it cannot.

On CUDA the rows go on decoding while the next sample prefills: after each of the prefill's
layers the step in flight is collected if it is done, and the next launched, a replay of a step
already captured, on the batch's own stream (`DecodeBatch.launch`). A grid's prefill spends much
of its time launching the methods' small kernels, time in which the device would otherwise wait.

Out of GPU memory with several rows, the batch is halved (said once) and the rows that no
longer fit are redone later; nothing finished is lost and nothing is produced twice. Out of
memory with a sample alone is one error line naming the sample and its prompt length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvbench.errors import KvbenchError
from kvbench.engine.chunked import DEFAULT_CHUNK_TOKENS
from kvbench.engine.decode import DecodeBatch, FinishedRow, fastest_batch_size, pages_needed
from kvbench.engine.prefill import DecodeRequest, Prefilled, prefill_shared
from kvbench.methods.base import Compressor, Method, ModelInfo

#: free memory kept aside when growing the decode pool, beyond the next prefill's measured needs
GROWTH_MARGIN = 1.25
#: the pool grows at least by this factor, so that it is copied (and its steps captured again) a few times only
POOL_GROWTH = 2
#: rows decoded together on CPU by default: with 8 rather than 4 the README's demo grid (SmolLM2, full cache and
#: SnapKV) took 0.90 of the time, and one configuration alone the same
CPU_BATCH_SIZE = 8
#: row counts ``auto`` times on CUDA, where a step costs nearly the same for 1 or 32 rows (it reads the
#: weights once); the fastest per sample-token is the cap, free memory decides below it
AUTO_BATCH_CANDIDATES = (32, 64, 128, 256, 512)
#: cached tokens per row while timing the candidates: a compressed cache of the papers' budgets
AUTO_PROBE_CACHE_TOKENS = 512


def auto_batch_size(model, batch_invariant: bool = False) -> int:
    """``--batch-size auto``: on CUDA the candidate row count whose decode step (by the kernels
    ``batch_invariant`` chooses) measures fastest per sample-token (free memory may lower it while running, see
    `generate_stream`); on CPU `CPU_BATCH_SIZE`."""
    if model.get_input_embeddings().weight.device.type != "cuda":
        return CPU_BATCH_SIZE
    return fastest_batch_size(model, AUTO_BATCH_CANDIDATES, AUTO_PROBE_CACHE_TOKENS, batch_invariant=batch_invariant)


@dataclass
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    #: cache length of each layer right after prefill (= prompt length where nothing was dropped)
    kept_per_layer: list[int]
    #: the sample's prefill, shared by every configuration that needed it
    prefill_seconds: float
    #: this configuration's share of the prefill (the shared forward pass over the configurations sharing it,
    #: plus its own extend when question-agnostic)
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


@dataclass
class StreamStats:
    """Where a stream's wall time went, filled as it runs (`kvbench bench` prints it): what decoding costs beside
    the steps themselves, and how full the steps were."""

    #: in the shared prefills (forward, compression, first token)
    prefill_seconds: float = 0.0
    #: copying prefilled caches into decode rows (and growing the pool for them)
    admit_seconds: float = 0.0
    #: in decode steps outside the prefills, from launch to their tokens on the host, CUDA graph captures included
    step_seconds: float = 0.0
    #: of which capturing CUDA graphs (warm-up steps included)
    capture_seconds: float = 0.0
    captures: int = 0
    steps: int = 0
    #: of which launched during a prefill (CUDA graph replays running beside it)
    steps_in_prefill: int = 0
    #: active rows over all steps (the tokens the steps produced)
    row_steps: int = 0


def generate_stream(model, methods: Method | Compressor | Sequence[Method | Compressor],
                    requests: Iterable[DecodeRequest], batch_size: int | None = 1,
                    say: Callable[[str], None] | None = None, use_cuda_graphs: bool = True,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, batch_invariant: bool = False,
                    stats: StreamStats | None = None) -> Iterator[Generation]:
    """Generate for every request and each configuration it names (``request.configurations``: indices into
    ``methods``, a single method standing for a list of one), up to ``batch_size`` rows decoded together in a
    step (None: `auto_batch_size`); yields each row as it finishes. Prefills run their per-token modules in
    chunks of ``chunk_tokens`` positions; with ``batch_invariant`` decode steps run the batch-invariant kernels
    (`kvbench.engine.invariant`), so a row's tokens do not depend on the other rows. ``stats``, if given, is
    filled as the stream runs. With CUDA graphs the rows decode while the next sample prefills: between the
    prefill's layers a finished step is collected and the next one launched, a replay of a captured step on the
    batch's own stream (on the CPU nothing is captured, and steps wait for the prefill). Only which steps rows
    share changes with it, which a row's tokens do not depend on with ``batch_invariant``.

    Every row's cache lies in pages of the batch's pool, as many as it needs. On CUDA the pool grows within the
    free memory less what the largest prefill so far needed beyond the memory in use (the next prefill's room);
    caches wait for rows to finish (and free their pages) when it cannot grow enough."""
    single = isinstance(methods, (Method, Compressor))
    compressors = [as_compressor(method, model) for method in ([methods] if single else methods)]
    batch = DecodeBatch(model, batch_size or auto_batch_size(model, batch_invariant), use_cuda_graphs=use_cuda_graphs,
                        batch_invariant=batch_invariant)
    prefill_room = 0
    source = iter(requests)
    redo: deque[DecodeRequest] = deque()
    #: caches of the last prefilled sample still waiting for a row
    waiting: deque[Prefilled] = deque()
    exhausted = False
    halving_said = memory_said = False
    #: after running out of memory, no prefill before a decode step
    decode_first = False

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
        """Out of memory: keep half of the batch's rows (all of one) in a pool of just their pages; the rest and the
        request in hand are redone, after at least one decode step (`decode_first`), so that finishing rows can
        free what the retry needs."""
        nonlocal halving_said, decode_first
        rows = max(1, len(batch.rows) // 2)
        if rows < len(batch.rows) and not halving_said and say is not None:
            say(f"out of GPU memory with {len(batch.rows)} decode rows: continuing with {rows}")
            halving_said = True
        batch.compact()  # the active rows first, so that halving keeps as many as it can
        requeued = [unfinished([prefilled]) for prefilled in batch.requeue_rows_from(rows)]
        batch.shrink(rows)
        redo.extendleft(reversed(([request_in_hand] if request_in_hand is not None else []) + requeued))
        decode_first = True
        torch.cuda.empty_cache()

    def admissible(pending: list[Prefilled]) -> list[Prefilled]:
        """The waiting caches that get a row and pages now, in order, after growing the pool within memory (a cache
        that does not fit waits for rows to finish and give their pages back; a later, smaller one may still fit).
        With no row decoding the first is taken whatever memory says: alone, it is tried (and said, if it does not
        fit)."""
        nonlocal memory_said
        candidates = pending[: len(batch.rows) - len(batch.active_rows)]
        required = batch.pages_in_use() + sum(pages_needed(prefilled) for prefilled in candidates)
        pages = batch.pages if required <= batch.pages else max(batch.pages, _pool_pages(batch, required, prefill_room))
        taken = _fitting(batch, candidates, pages)
        if not taken and candidates and not batch.active_rows:
            taken = candidates[:1]
        if taken:
            try:
                batch.reserve(max(pages, batch.pages_in_use() + sum(pages_needed(prefilled) for prefilled in taken)))
            except Exception as error:
                if not _out_of_memory(error) or not batch.active_rows:
                    raise
                # the free memory is there but in pieces too small for a layer's grown pool: the caches that fit the
                # pool as it is go in, the others wait for rows to finish
                torch.cuda.empty_cache()
                taken = _fitting(batch, candidates, batch.pages)
        if len(taken) < len(candidates) and batch.active_rows and not memory_said and say is not None:
            say(f"decode rows bounded by GPU memory: {len(batch.active_rows)} rows hold "
                f"{batch.pages_in_use()} pages of {batch.page_bytes() / 2**20:.1f} MiB")
            memory_said = True
        return taken

    def place_waiting() -> None:
        """Admit every waiting cache there is room for, in one admission; out of memory, halve the batch and redo the
        sample's rest."""
        batch.collect(wait=True)  # the step in flight first: the rows it finishes give their pages back
        pending = list(waiting)
        waiting.clear()
        try:
            taken = admissible(pending)
            if taken:
                batch.admit(taken)
        except Exception as error:
            if not _out_of_memory(error):
                raise
            if not batch.active_rows:
                raise KvbenchError(f"out of GPU memory decoding {_describe(pending[0].request)} alone") from None
            halve(unfinished(pending))  # an admission that fails admits none of its caches
            return
        admitted = {id(prefilled) for prefilled in taken}
        waiting.extend(prefilled for prefilled in pending if id(prefilled) not in admitted)

    def keep_decoding() -> None:
        """Between a prefill's layers: collect the step in flight if it is done, and launch the next as a replay."""
        batch.collect(wait=False)
        if not batch.in_flight and batch.launch(replay_only=True):
            stats.steps_in_prefill += 1

    def finished_rows(finished: list[FinishedRow] | None = None) -> Iterator[Generation]:
        """``finished``, or the rows that finished in steps collected since the last call (between a prefill's
        layers, or by a change to the batch)."""
        stats.steps, stats.row_steps = batch.steps, batch.row_steps
        stats.capture_seconds, stats.captures = batch.capture_seconds, batch.captures
        for row in batch.take_finished() if finished is None else finished:
            yield _generation(row.prefilled, row.tokens, row.decode_seconds, row.decode_cost_seconds)

    device = model.get_input_embeddings().weight.device
    stats = stats if stats is not None else StreamStats()
    while True:
        while True:
            if waiting:
                started = time.perf_counter()
                place_waiting()
                stats.admit_seconds += time.perf_counter() - started
                yield from finished_rows()  # admission collects the step in flight
                if waiting:
                    break  # a cache waits for a row or pages: decode first
                continue
            if batch.free_row() is None:
                break  # every row is taken: decode before prefilling more
            if decode_first and batch.active_rows:
                break
            request = next_request()
            if request is None:
                break
            in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            started = time.perf_counter()
            try:
                keep_decoding()  # the rows decode from the prefill's start (out of memory is handled as the prefill's)
                prefilled = prefill_shared(model, compressors, request, chunk_tokens, between_layers=keep_decoding)
            except Exception as error:
                if not _out_of_memory(error):
                    raise
                if batch.pages > batch.pages_in_use():  # first the free pages: a pool of just the rows' own
                    batch.shrink(len(batch.rows))
                    torch.cuda.empty_cache()
                    redo.appendleft(request)
                    continue
                if not batch.active_rows:
                    raise KvbenchError(f"out of GPU memory prefilling {_describe(request)} alone") from None
                halve(request)
                continue
            stats.prefill_seconds += time.perf_counter() - started
            yield from finished_rows()
            if prefilled[0].peak_memory_bytes is not None:
                prefill_room = max(prefill_room, prefilled[0].peak_memory_bytes - in_use)
            for one in prefilled:
                if one.finished:
                    yield _generation(one, [one.first_token], 0.0, 0.0)
                else:
                    waiting.append(one)
        if not batch.active_rows:
            yield from finished_rows()
            if not waiting and exhausted and not redo:
                return
            continue
        decode_first = False
        started = time.perf_counter()
        try:
            finished = batch.step()
        except Exception as error:
            if not _out_of_memory(error) or len(batch.rows) == 1:
                raise
            halve(None)
            yield from finished_rows()
            continue
        stats.step_seconds += time.perf_counter() - started
        yield from finished_rows(finished)


def _fitting(batch: DecodeBatch, candidates: list[Prefilled], pages: int) -> list[Prefilled]:
    """The candidates, in order, whose pages fit beside those in use in a pool of ``pages`` pages."""
    taken, used = [], batch.pages_in_use()
    for prefilled in candidates:
        if used + pages_needed(prefilled) <= pages:
            taken.append(prefilled)
            used += pages_needed(prefilled)
    return taken


def _pool_pages(batch: DecodeBatch, required: int, prefill_room: int) -> int:
    """Pages the pool should grow to for ``required`` pages in use: at least POOL_GROWTH times its size (fewer
    copies), on CUDA at most what free memory holds (`pages_within_memory`), which may be fewer than required."""
    wanted = max(required, batch.pages * POOL_GROWTH)
    if batch.device.type != "cuda":
        return wanted
    free, _ = torch.cuda.mem_get_info(batch.device)
    reusable = torch.cuda.memory_reserved(batch.device) - torch.cuda.memory_allocated(batch.device)
    return min(wanted, pages_within_memory(free + reusable, batch.buffer_bytes(), prefill_room, batch.page_bytes()))


def pages_within_memory(available: int, pool_bytes: int, prefill_room: int, page_bytes: int) -> int:
    """Pages a pool may have: what the ``available`` device memory and its present pages (``pool_bytes``) hold,
    less ``prefill_room`` for the next prefill, less the growth margin; a new pool is filled while the old one is
    still held, one layer at a time, which the margin covers."""
    return int((available + pool_bytes - prefill_room) / GROWTH_MARGIN // page_bytes)


def generate_greedy(model, prompt_ids, method: Method | Compressor, max_new_tokens: int, eos_token_ids: set[int],
                    sample: dict | None = None, batch_invariant: bool = False) -> Generation:
    """One sample, alone: prefill, compress layer by layer, decode greedily at the original positions."""
    request = DecodeRequest(list(prompt_ids), max_new_tokens, set(eos_token_ids), sample)
    return next(generate_stream(model, method, [request], batch_size=1, batch_invariant=batch_invariant))
