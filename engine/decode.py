"""A decode batch of compressed caches: preallocated buffers, valid-slot masks, one static step.

After its prefill a sample's compressed cache takes a free row of the batch. Each layer has
one buffer of shape (rows, kv_heads, slots, head_dim) for keys and one for values; a row's
layers hold different numbers of kept tokens (PyramidKV, WindowKV, PrefixKV budgets, or
prompts of different lengths), so each (layer, row) has its own write position and a mask
of valid slots, and attention runs over the valid slots only. Positions continue per row
from the sample's own prompt length.

Eviction while decoding (PrefixKV, Elastic Cache) clears a slot's valid bit instead of
shifting the cache. Keys are stored after RoPE, so attention over a row is a sum over the
*set* of valid slots, and the ``i``-th entry of the shifted cache is the ``i``-th valid slot
(`tests/test_decode.py` checks that the two give the same attention). The method's answers
are worked out at admission for every step (`kvbench.engine.prefill.eviction_schedule`).

A step is therefore a fixed sequence of tensor operations for a given number of rows and
slots. Several batches (a grid's lanes, `kvbench.engine.generate`) step together
(`JointStep`): the model runs once over all their rows, each attending within its own
batch's buffers. On CUDA a step is captured once per combination of (batch, rows bucket)
as a CUDA graph and replayed; on CPU it runs eagerly. If capture fails the batch says so
once and runs eagerly.

With ``batch_invariant`` the step's reductions run in kernels whose order a row fixes alone
(`kvbench.engine.invariant`): a sample's tokens are then the same in any batch, beside any
other samples, and whatever the buffers' capacity; the step is captured the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from kvbench.errors import error_line
from kvbench.engine.hook import DecodeLane, DecodeSession, active, cache_keyword, install_hook
from kvbench.engine.invariant import check_invariance, invariant_forwards
from kvbench.engine.prefill import DecodeRequest, Prefilled, synchronize
from kvbench.methods.base import SampleCompression

log = logging.getLogger(__name__)

#: slots are allocated in multiples of this, so that a new sample rarely changes the step's shapes
SLOT_GRANULE = 256
#: spare slots past the last write: warming up a CUDA graph runs two steps that write there
SPARE_SLOTS = 2


def kv_head_layout(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model's cache, from its config."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


class StepCache:
    """What the model's attention sees as its cache during a decode step: writes each row's new key and value
    into its lane's buffers (`DecodeSession.write`); the hooked attention reads the buffers from the session."""

    def __init__(self, session: DecodeSession, true: torch.Tensor):
        self.session = session
        self.true = true

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.session.write(layer_idx, key_states, value_states, self.true)
        return key_states, value_states


@dataclass
class Row:
    """A sample in the batch: its prefill, the tokens generated so far, its timing."""

    prefilled: Prefilled
    tokens: list[int]
    admitted_at: float
    decode_cost_seconds: float = 0.0


@dataclass
class FinishedRow:
    prefilled: Prefilled
    tokens: list[int]
    decode_seconds: float
    decode_cost_seconds: float


@dataclass
class DecodeBatch:
    """Up to ``max_rows`` samples decoded together, one token each per step."""

    model: torch.nn.Module
    max_rows: int
    use_cuda_graphs: bool = True
    #: decode steps by the batch-invariant kernels (`kvbench.engine.invariant`)
    batch_invariant: bool = False
    #: host side of each row (None: free)
    rows: list[Row | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        install_hook(self.model)
        if self.batch_invariant:
            check_invariance(self.model)
        config = self.model.config
        embeddings = self.model.get_input_embeddings().weight
        self.device = embeddings.device
        self.dtype = embeddings.dtype
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads, self.head_dim = kv_head_layout(config)
        self.rows = [None] * self.max_rows
        self.slots = 0
        self.steps_capacity = 0
        self.use_cuda_graphs = self.use_cuda_graphs and self.device.type == "cuda"
        #: counts the reallocations: a captured step that read older buffers is stale (`JointStep`)
        self.epoch = 0
        self._own_step: JointStep | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.evictions: torch.Tensor | None = None
        self._allocate(self.max_rows, 0, 0)

    # -- buffers ------------------------------------------------------------------------------------

    def _allocate(self, rows: int, slots: int, steps: int) -> None:
        """(Re)allocate every buffer for ``rows`` x ``slots`` (and ``steps`` of eviction schedule), keeping contents.

        Layer by layer, each old buffer released as soon as its contents moved, so that growing (or,
        out of memory, shrinking) needs the new size plus one layer's buffers, not both sizes whole.
        """
        self.epoch += 1  # captured steps read the old buffers
        old_slots = self.slots
        kept_rows = min(rows, len(self.keys[0])) if self.keys else 0
        kept_slots = min(slots, old_slots)
        shape = (rows, self.num_kv_heads, slots, self.head_dim)
        for buffers in (self.keys, self.values):
            for layer in range(self.num_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(buffers):
                    if kept_rows and kept_slots:
                        new[:kept_rows, :, :kept_slots] = buffers[layer][:kept_rows, :, :kept_slots]
                    buffers[layer] = new
                else:
                    buffers.append(new)
        valid = torch.zeros(self.num_layers, rows, slots, dtype=torch.bool, device=self.device)
        write_pos = torch.zeros(self.num_layers, rows, dtype=torch.long, device=self.device)
        tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        steps_taken = torch.zeros(rows, dtype=torch.long, device=self.device)
        evictions = None
        if steps:
            evictions = torch.full((self.num_layers, rows, steps), -1, dtype=torch.int32, device=self.device)
        if kept_rows:
            valid[:, :kept_rows, :kept_slots] = self.valid[:, :kept_rows, :kept_slots]
            write_pos[:, :kept_rows] = self.write_pos[:, :kept_rows]
            tokens[:kept_rows] = self.tokens[:kept_rows]
            positions[:kept_rows] = self.positions[:kept_rows]
            steps_taken[:kept_rows] = self.steps_taken[:kept_rows]
            if evictions is not None and self.evictions is not None:
                evictions[:, :kept_rows, : self.steps_capacity] = self.evictions[:, :kept_rows]
        self.valid, self.write_pos, self.tokens, self.positions, self.steps_taken = (
            valid, write_pos, tokens, positions, steps_taken)
        self.evictions = evictions
        self.slots, self.steps_capacity = slots, steps
        self.row_index = torch.arange(rows, device=self.device)
        for row in range(kept_rows, rows):
            self._clear_row(row)

    def buffer_bytes(self) -> int:
        """Bytes the key and value buffers hold now."""
        return self.slots * len(self.rows) * self.bytes_per_slot_row()

    def bytes_per_slot_row(self) -> int:
        """Bytes one slot of one row costs over all layers (keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def release_buffers(self) -> None:
        """An idle batch gives its cache buffers back to the device (the next admit grows them again)."""
        if self.active_rows:
            raise RuntimeError("release_buffers() needs an idle batch")
        self._allocate(len(self.rows), 0, 0)

    # -- rows -------------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> list[int]:
        return [index for index, row in enumerate(self.rows) if row is not None]

    def free_row(self) -> int | None:
        return next((index for index, row in enumerate(self.rows) if row is None), None)

    def admit(self, prefilled: Prefilled) -> int:
        """Copy a prefilled sample's cache into a free row (growing the slots if needed); its row index."""
        row = self.free_row()
        if row is None:
            raise RuntimeError("admit() needs a free row")
        needed_slots = slots_needed(prefilled)
        needed_steps = prefilled.request.max_new_tokens - 1 if prefilled.evictions is not None else 0
        if needed_slots > self.slots or needed_steps > self.steps_capacity:
            steps = max(self.steps_capacity, needed_steps)
            self._allocate(len(self.rows), max(self.slots, round_up_slots(needed_slots)), steps)
        with torch.inference_mode():
            for layer, (keys, values) in enumerate(prefilled.kept):
                kept = keys.shape[-2]
                self.keys[layer][row, :, :kept] = keys[0]
                self.values[layer][row, :, :kept] = values[0]
            # every layer's mask and write position at once: a grid admits dozens of rows a sample
            kept_per_layer = torch.tensor(prefilled.kept_per_layer, device=self.device)
            self.valid[:, row] = torch.arange(self.slots, device=self.device) < kept_per_layer[:, None]
            self.write_pos[:, row] = kept_per_layer
            self.tokens[row] = prefilled.first_token
            self.positions[row] = len(prefilled.request.prompt_ids)
            self.steps_taken[row] = 0
            if self.evictions is not None:
                self.evictions[:, row] = -1
                if prefilled.evictions is not None:
                    schedule = torch.tensor(prefilled.evictions, dtype=torch.int32, device=self.device)
                    self.evictions[:, row, : schedule.shape[1]] = schedule
        prefilled.kept = None  # the batch holds the cache now
        self.rows[row] = Row(prefilled, [prefilled.first_token], time.perf_counter())
        return row

    def _clear_row(self, row: int) -> None:
        """A free row attends to one zero slot, so that its (ignored) output stays finite."""
        self.valid[:, row] = False
        if self.slots:
            self.valid[:, row, 0] = True
        self.write_pos[:, row] = 0
        self.tokens[row] = 0
        self.positions[row] = 0
        self.steps_taken[row] = 0

    def requeue_rows_from(self, first_row: int) -> list[Prefilled]:
        """Take rows ``first_row`` and beyond out of the batch unfinished (their samples must be redone)."""
        taken = []
        for index in range(first_row, len(self.rows)):
            if self.rows[index] is not None:
                taken.append(self.rows[index].prefilled)
                self.rows[index] = None
        return taken

    def shrink(self, rows: int) -> None:
        """Keep only the first ``rows`` rows (the caller requeued the others)."""
        self.rows = self.rows[:rows]
        self._allocate(rows, self.slots, self.steps_capacity)

    def compact(self) -> None:
        """Move the active rows to the lowest indices, so that steps run on the smallest bucket."""
        active = self.active_rows
        for target, source in enumerate(active):
            if target == source:
                continue
            with torch.inference_mode():
                for layer in range(self.num_layers):
                    self.keys[layer][target] = self.keys[layer][source]
                    self.values[layer][target] = self.values[layer][source]
                for tensor in (self.valid, self.write_pos):
                    tensor[:, target] = tensor[:, source]
                for tensor in (self.tokens, self.positions, self.steps_taken):
                    tensor[target] = tensor[source]
                if self.evictions is not None:
                    self.evictions[:, target] = self.evictions[:, source]
                self._clear_row(source)
            self.rows[target], self.rows[source] = self.rows[source], None

    # -- the step -----------------------------------------------------------------------------------------

    def bucket(self) -> int:
        """Rows a step runs on: a power of two (or the whole batch) covering the highest active row."""
        highest = max(self.active_rows) + 1
        return min(len(self.rows), 1 << math.ceil(math.log2(highest)))

    def evict(self, rows: int) -> None:
        """Clear, in each layer and row, the valid slot the schedule names for this step: the
        (index + 1)-th valid slot is the index-th entry of the shifted cache."""
        step_index = self.steps_taken[:rows].clamp(max=self.steps_capacity - 1)
        index = self.evictions[:, :rows].gather(2, step_index.view(1, rows, 1).expand(self.num_layers, rows, 1))
        valid = self.valid[:, :rows]
        rank = valid.cumsum(dim=-1, dtype=torch.int32)
        target = (rank == index + 1) & valid
        valid &= ~target

    def lane(self, rows: int) -> DecodeLane:
        """This batch's part of a decode step over its first ``rows`` rows."""
        return DecodeLane(self.keys, self.values, self.valid, self.write_pos, rows, self.row_index)

    def advance(self, rows: int, next_tokens: torch.Tensor) -> None:
        """After a step: the first ``rows`` rows' next input tokens, one position and slot further on."""
        self.tokens[:rows] = next_tokens
        self.positions[:rows] += 1
        self.steps_taken[:rows] += 1
        self.write_pos[:, :rows] += 1

    def step_state(self) -> tuple[torch.Tensor, ...]:
        """What a step changes besides the cache buffers (a capture's warm-up steps are undone through it)."""
        return self.valid, self.write_pos, self.tokens, self.positions, self.steps_taken

    def take_tokens(self, tokens: list[int], cost_seconds: float) -> list[FinishedRow]:
        """Each active row's token of a step (``tokens``: one per row of the step, by row index), its share of the
        step's time; the rows that finished leave the batch."""
        finished = []
        for index in self.active_rows:
            row = self.rows[index]
            row.decode_cost_seconds += cost_seconds
            token = tokens[index]
            row.tokens.append(token)
            request = row.prefilled.request
            if token in request.stop_ids or len(row.tokens) >= request.max_new_tokens:
                finished.append(FinishedRow(row.prefilled, row.tokens, time.perf_counter() - row.admitted_at,
                                            row.decode_cost_seconds))
                self.rows[index] = None
                self._clear_row(index)
        return finished

    def decode_logits(self, rows: int) -> torch.Tensor:
        """This batch's first ``rows`` rows through one step (`JointStep.logits`): logits (rows, vocab)."""
        return self._step().logits([(self, rows)])

    def step(self) -> list[FinishedRow]:
        """One decode step for every active row of this batch alone; the rows that finished (and left the batch)."""
        return self._step().step([self])

    def _step(self) -> JointStep:
        if self._own_step is None:
            self._own_step = JointStep(self.model)
        return self._own_step


class JointStep:
    """Decode steps over the active rows of several decode batches (the lanes of `kvbench.engine.generate`) at once.

    The model runs once on all their rows, laid lane after lane: every weight is read once a step whatever the
    number of lanes, and each lane's attention reads its own buffers (`DecodeSession`). On CUDA a step is captured
    as a CUDA graph per (lane, rows bucket, eviction) combination, all in one memory pool (steps never overlap);
    a lane's reallocation makes the graphs that read its buffers stale. The batches must agree on
    ``use_cuda_graphs`` and ``batch_invariant``.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        device = model.get_input_embeddings().weight.device
        # A 4-D mask makes transformers skip building one (it would be sized for a single cache length);
        # the hook reads each lane's valid slots instead.
        self._short_circuit_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._cache_keyword = cache_keyword(model)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        #: graphs captured, and the seconds they took (warm-up steps included)
        self.captures = 0
        self.capture_seconds = 0.0

    def logits(self, parts: list[tuple[DecodeBatch, int]]) -> torch.Tensor:
        """Evict what each row's schedule says, then run the model on each part's first rows' next token: logits
        (rows of all parts, vocab). Writes the tokens' keys and values into the buffers; `advance` moves on."""
        for batch, rows in parts:
            if batch.evictions is not None:
                batch.evict(rows)
        batch_invariant = parts[0][0].batch_invariant
        session = DecodeSession([batch.lane(rows) for batch, rows in parts], batch_invariant)
        tokens = _lane_after_lane([batch.tokens[:rows] for batch, rows in parts])
        positions = _lane_after_lane([batch.positions[:rows] for batch, rows in parts])
        total = tokens.shape[0]
        cache = {self._cache_keyword: StepCache(session, self._true)}
        kernels = invariant_forwards(self.model) if batch_invariant else contextlib.nullcontext()
        with active(self.model, session), kernels:
            output = self.model(input_ids=tokens.view(total, 1), position_ids=positions.view(total, 1),
                                attention_mask=self._short_circuit_mask, use_cache=True, logits_to_keep=1, **cache)
        return output.logits[:, -1]

    def _eager_step(self, parts: list[tuple[DecodeBatch, int]]) -> torch.Tensor:
        next_tokens = self.logits(parts).argmax(dim=-1)
        start = 0
        for batch, rows in parts:
            batch.advance(rows, next_tokens[start: start + rows])
            start += rows
        return next_tokens

    def _captured_step(self, parts: list[tuple[DecodeBatch, int]]) -> torch.Tensor | None:
        global _capture_failure_said
        key = tuple((id(batch), batch.epoch, rows, batch.evictions is not None) for batch, rows in parts)
        if key not in self._graphs:
            self._drop_stale([batch for batch, _ in parts])
            try:
                self._graphs[key] = self._capture(parts)
            except Exception as error:  # any capture failure: fall back to eager steps, said once a process
                for batch, _ in parts:
                    batch.use_cuda_graphs = False
                if not _capture_failure_said:
                    log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly",
                                error_line(error))
                    _capture_failure_said = True
                return None
        graph, output = self._graphs[key]
        graph.replay()
        return output

    def _drop_stale(self, batches: list[DecodeBatch]) -> None:
        """Forget the graphs that read buffers one of ``batches`` has since reallocated."""
        epochs = {id(batch): batch.epoch for batch in batches}
        for key in [key for key in self._graphs
                    if any(epochs.get(batch_id, epoch) != epoch for batch_id, epoch, _, _ in key)]:
            del self._graphs[key]

    def _capture(self, parts: list[tuple[DecodeBatch, int]]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        started = time.perf_counter()
        state = [[tensor.clone() for tensor in batch.step_state()] for batch, _ in parts]
        device = self._true.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(SPARE_SLOTS):  # warm-up: allocations and lazy initialisation happen outside the graph
                self._eager_step(parts)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._restore(parts, state)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            output = self._eager_step(parts)
        self._restore(parts, state)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
        return graph, output

    @staticmethod
    def _restore(parts: list[tuple[DecodeBatch, int]], state: list[list[torch.Tensor]]) -> None:
        for (batch, _), saved in zip(parts, state):
            for tensor, before in zip(batch.step_state(), saved):
                tensor.copy_(before)

    @torch.inference_mode()
    def step(self, batches: list[DecodeBatch]) -> list[FinishedRow]:
        """One decode step for every active row of ``batches``; the rows that finished (and left their batch)."""
        parts = [(batch, batch.bucket()) for batch in batches if batch.active_rows]
        started = time.perf_counter()
        output = self._captured_step(parts) if parts[0][0].use_cuda_graphs else None
        if output is None:
            output = self._eager_step(parts)
        tokens = output.tolist()  # waits for the step
        cost_seconds = (time.perf_counter() - started) / sum(len(batch.active_rows) for batch, _ in parts)
        finished, start = [], 0
        for batch, rows in parts:
            finished += batch.take_tokens(tokens[start: start + rows], cost_seconds)
            start += rows
        return finished


def _lane_after_lane(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


_capture_failure_said = False


def synthetic_cache(model, cache_tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random keys and values of ``cache_tokens`` per layer (rows for timing decode steps), drawn on the model's
    device: gigabytes of them would take the CPU minutes."""
    embeddings = model.get_input_embeddings().weight
    generator = torch.Generator(embeddings.device).manual_seed(seed)
    kv_heads, head_dim = kv_head_layout(model.config)
    kept = []
    for _ in range(model.config.num_hidden_layers):
        keys = torch.randn(1, kv_heads, cache_tokens, head_dim, generator=generator, device=embeddings.device,
                           dtype=embeddings.dtype)
        kept.append((keys, torch.randn_like(keys)))
    return kept


def synthetic_prefilled(kept: list[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int) -> Prefilled:
    """A sample as if prefilled and compressed to ``kept`` (which admitting it copies, so rows may share it)."""
    cache_tokens = kept[0][0].shape[-2]
    request = DecodeRequest([0] * cache_tokens, max_new_tokens, set())
    kv_bytes = sum(keys.nbytes + values.nbytes for keys, values in kept)
    # no method: the rows are random, nothing is selected or evicted
    return Prefilled(request, SampleCompression(None), kept, [cache_tokens] * len(kept), first_token=1,
                     prefill_seconds=0.0, prefill_cost_seconds=0.0, kv_cache_bytes=kv_bytes, peak_memory_bytes=None)


def fastest_batch_size(model, candidates: tuple[int, ...], cache_tokens: int, steps: int = 6,
                       batch_invariant: bool = False) -> int:
    """The candidate row count whose decode step (CUDA graph, by the kernels ``batch_invariant`` chooses) costs
    least per sample-token, with rows holding ``cache_tokens`` each; candidates past the first that does not fit
    in memory are not tried."""
    kept = synthetic_cache(model, cache_tokens)
    device = kept[0][0].device
    best, best_cost = candidates[0], math.inf
    for rows in candidates:
        batch = None
        try:
            batch = DecodeBatch(model, rows, batch_invariant=batch_invariant)
            for _ in range(rows):
                batch.admit(synthetic_prefilled(kept, steps + 3))
            batch.step()  # capture (and warm-up) outside the timing
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                batch.step()
            synchronize(device)
            cost = (time.perf_counter() - started) / steps / rows
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def slots_needed(prefilled: Prefilled) -> int:
    """Slots a sample's row needs: its longest layer after prefill, every token it may generate, the spare ones."""
    return max(prefilled.kept_per_layer) + prefilled.request.max_new_tokens - 1 + SPARE_SLOTS


def round_up_slots(slots: int) -> int:
    """Slots allocated for ``slots`` needed: the next multiple of SLOT_GRANULE."""
    return -(-slots // SLOT_GRANULE) * SLOT_GRANULE
