"""A decode batch of compressed caches: a pool of cache pages, valid-slot masks, one static step.

After its prefill a sample's compressed cache takes a free row of the batch and as many pages of the pool as
it needs: its longest layer after prefill plus every token it may generate (`slots_needed`), in pages of
PAGE_SLOTS slots. Each layer has one pool of shape (pages, kv_heads, PAGE_SLOTS, head_dim) for keys and one for
values, and each row a page table: its slot ``s`` lies in page ``table[row, s // PAGE_SLOTS]`` at offset
``s % PAGE_SLOTS``. So a row costs the memory it needs, whatever the other rows need: a grid's compressed rows
(a few hundred slots) and its full-cache rows (the whole prompt) share one batch and one step. A row's layers
hold different numbers of kept tokens (PyramidKV, WindowKV, PrefixKV budgets), so each (layer, row) has its own
write position, and each slot a valid bit; attention runs over the valid slots only. Positions continue per row
from the sample's own prompt length.

Eviction while decoding (PrefixKV, Elastic Cache) clears a slot's valid bit instead of
shifting the cache. Keys are stored after RoPE, so attention over a row is a sum over the
*set* of valid slots, and the ``i``-th entry of the shifted cache is the ``i``-th valid slot
(`tests/test_decode.py` checks that the two give the same attention). The method's answers
are worked out at admission for every step (`kvbench.engine.prefill.eviction_schedule`).

A step is therefore a fixed sequence of tensor operations for a given number of rows and
pool size. On CUDA it is captured once per rows bucket as a CUDA graph and replayed; on
CPU it runs eagerly. If capture fails the batch says so once and runs eagerly.

On CUDA the steps run on a stream of their own, launched (`DecodeBatch.launch`) and collected
(`DecodeBatch.collect`) apart, so that a step can run on the device while the host prefills the
next sample on the default stream: a grid's prefill spends much of its time launching small
kernels, time in which the device would otherwise idle. Whatever changes the batch (admission,
the pool's growth, halving) first collects the step in flight, and the next step waits for it.

With ``batch_invariant`` the step's reductions run in kernels whose order a row fixes alone
(`kvbench.engine.invariant`): a sample's tokens are then the same in any batch, beside any
other samples, wherever its pages lie and whatever the pool's size; the step is captured the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from kvbench.errors import error_line
from kvbench.engine.hook import DecodeSession, active, cache_keyword, install_hook
from kvbench.engine.invariant import check_invariance, invariant_forwards
from kvbench.engine.prefill import DecodeRequest, Prefilled, synchronize
from kvbench.methods.base import SampleCompression

log = logging.getLogger(__name__)

#: slots a page holds; the decode attention kernel reads a row one page a block, so this is also its block. On an
#: H100, blocks of 32 to 256 slots with 2 to 8 warps and 2 or 3 stages, and a fixed split of each row's slots in
#: chunks of 512 to 2,048 combined in order, all took within about 10% of 64 at a grid's shapes (512 rows of 600
#: slots to 8 rows of 8,232: 0.2 to 0.6 ms a layer); only the split helped, and only the fewest long rows
PAGE_SLOTS = 64
#: pages no row owns: page-table entries past a row's own pages point at the empty page (never written, never
#: valid, so a gathered row attends to nothing there); a free row's entries all point at the scratch page, which
#: it writes and attends to (its output is ignored; it only has to stay finite)
EMPTY_PAGE, SCRATCH_PAGE, FIRST_ROW_PAGE = 0, 1, 2
#: page tables grow in steps of this many entries (2,048 slots), so that longer prompts rarely change the step
TABLE_GRANULE = 32
#: steps run on a power of two of rows up to this many, on multiples of it beyond: the linear layers' cost follows
#: the rows a step runs on, in tiles of 64 or 128 rows, and on an H100 a grid-shaped step of 286 active rows (275 of
#: 600 slots, 11 of 7,000, evicting) took 33.8 ms on 320 rows against 38.0 ms on 512
BUCKET_STEP = 64
#: spare slots past the last write: warming up a CUDA graph runs two steps that write there
SPARE_SLOTS = 2


def kv_head_layout(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model's cache, from its config."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


class StepCache:
    """What the model's attention sees as its cache during a decode step: writes each row's new key and value
    into its page (`DecodeSession.write`); the hooked attention reads the pages from the session."""

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
class StepInFlight:
    """A launched step: its rows, its active rows, when it was launched, and its tokens' arrival on the host (None on
    CPU, where a step is done when launched)."""

    rows: int
    active: int
    launched_at: float
    done: torch.cuda.Event | None


@dataclass
class FinishedRow:
    prefilled: Prefilled
    tokens: list[int]
    decode_seconds: float
    decode_cost_seconds: float


@dataclass
class DecodeBatch:
    """Up to ``max_rows`` samples decoded together, one token each per step, their caches in one page pool."""

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
        self.use_cuda_graphs = self.use_cuda_graphs and self.device.type == "cuda"
        on_cuda = self.device.type == "cuda"
        #: the steps' stream (high priority: a step's latency bounds how many steps fit in a prefill)
        self._stream = torch.cuda.Stream(self.device, priority=-1) if on_cuda else None
        #: recorded on the default stream after a change to the batch there; the next step waits for it
        self._changed: torch.cuda.Event | None = None
        self._in_flight: StepInFlight | None = None
        #: each step's tokens land here (pinned, so that the copy does not hold the host)
        self._host_tokens = torch.zeros(self.max_rows, dtype=torch.long, pin_memory=on_cuda)
        #: rows finished by collected steps and not yet taken (`take_finished`)
        self.finished: list[FinishedRow] = []
        #: steps collected, and their active rows summed (the tokens they produced)
        self.steps = self.row_steps = 0
        #: steps of eviction schedule a row can hold
        self.steps_capacity = 0
        self._short_circuit_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        # device scalars for the step's masked writes: a Python value would be copied from the host, which a CUDA
        # graph capture refuses
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)
        self._cache_keyword = cache_keyword(self.model)
        #: captured steps by (rows, eviction); a reallocation makes them stale
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        #: graphs captured, and the seconds they took (warm-up steps included)
        self.captures = 0
        self.capture_seconds = 0.0
        #: entries of a row's page table
        self.table_pages = TABLE_GRANULE
        #: page-table entries the eviction reads: enough for the longest row that evicts (a grid's full-cache rows,
        #: as long as their prompts, evict nothing), in steps of TABLE_GRANULE
        self.evict_table_pages = TABLE_GRANULE
        self._allocate()

    # -- memory -------------------------------------------------------------------------------------

    def _allocate(self) -> None:
        """A new batch's pool (the pages no row owns only) and the state of its rows, all free."""
        rows, pages = self.max_rows, FIRST_ROW_PAGE
        shape = (pages, self.num_kv_heads, PAGE_SLOTS, self.head_dim)
        #: per layer, the key and value pools
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.valid = torch.zeros(self.num_layers, pages, PAGE_SLOTS, dtype=torch.bool, device=self.device)
        self.valid[:, SCRATCH_PAGE, 0] = True
        #: each row's pages, in slot order (empty: a free row)
        self.row_pages: list[list[int]] = [[] for _ in range(rows)]
        self.free_pages: list[int] = []  # popped from the end: lowest first
        self.page_table = torch.full((rows, self.table_pages), SCRATCH_PAGE, dtype=torch.long, device=self.device)
        self.write_pos = torch.zeros(self.num_layers, rows, dtype=torch.long, device=self.device)
        self.tokens, self.positions, self.steps_taken, self.live = (
            torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(4))
        self.evictions: torch.Tensor | None = None
        #: pages in the pool
        self.pages = pages
        self.row_index = torch.arange(rows, device=self.device)

    def _grow(self, pages: int) -> None:
        """A pool of ``pages`` pages, each page keeping its number (the rows and their state stay as they are).

        Layer by layer, each old pool released as soon as it is copied, so that growing needs the new size plus one
        layer's pool, not both sizes whole. If an allocation fails part way (out of memory), the layers already grown
        hold every page at its number and the pool goes on at its old size."""
        self._drop_graphs()  # captured steps read the old tensors
        old = self.pages
        for pool in (self.keys, self.values):
            for layer in range(self.num_layers):
                if pool[layer].shape[0] >= pages:  # grown by an earlier attempt, or not cut by a shrink, that failed part way
                    continue
                new = torch.zeros((pages, *pool[layer].shape[1:]), dtype=self.dtype, device=self.device)
                new[:old] = pool[layer][:old]
                pool[layer] = new
        valid = torch.zeros(self.num_layers, pages, PAGE_SLOTS, dtype=torch.bool, device=self.device)
        valid[:, :old] = self.valid[:, :old]
        self.valid = valid
        self.free_pages = list(range(pages - 1, old - 1, -1)) + self.free_pages  # popped from the end: lowest first
        self.pages = pages

    def _lengthen(self, table_pages: int, steps: int) -> None:
        """Page tables of ``table_pages`` entries and eviction schedules of ``steps`` steps for every row, keeping
        what they hold (the pool stays as it is)."""
        self._drop_graphs()
        rows = len(self.rows)
        if table_pages > self.table_pages:
            free = torch.tensor([not own for own in self.row_pages], device=self.device)
            added = torch.where(free, SCRATCH_PAGE, EMPTY_PAGE)[:, None].expand(rows, table_pages - self.table_pages)
            self.page_table = torch.cat([self.page_table, added], dim=1)
            self.table_pages = table_pages
        if steps > self.steps_capacity:
            evictions = torch.full((self.num_layers, rows, steps), -1, dtype=torch.int32, device=self.device)
            if self.evictions is not None:
                evictions[:, :, : self.steps_capacity] = self.evictions
            self.evictions, self.steps_capacity = evictions, steps

    def _drop_graphs(self) -> None:
        """Forget the captured steps, and their memory pool: the allocator keeps a pool whose graphs are all gone
        (while any of its blocks lives) with no user, and asserts when a later capture shares it, so the next
        capture starts a new one."""
        self._graphs.clear()
        self._graph_pool = None

    def page_bytes(self) -> int:
        """Bytes one page costs over all layers (keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * PAGE_SLOTS * self.head_dim * element

    def buffer_bytes(self) -> int:
        """Bytes the key and value pools hold now."""
        return self.pages * self.page_bytes()

    def pages_in_use(self) -> int:
        """Pages the pool cannot do without: the rows' own and the two no row owns."""
        return self.pages - len(self.free_pages)

    def reserve(self, pages: int) -> None:
        """Grow the pool to ``pages`` pages (keeping every row and page), if it has fewer."""
        if pages > self.pages:
            with self._changing():
                self._grow(pages)

    @contextlib.contextmanager
    def _changing(self):
        """Around a change to the batch on the current stream: the step in flight is collected first (its finished
        rows kept for `take_finished`) and the current stream waits for the steps' stream; the next step waits for
        the change."""
        if self._in_flight is not None:
            self.collect(wait=True)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        yield
        if self._stream is not None:
            self._changed = torch.cuda.Event()
            self._changed.record(torch.cuda.current_stream(self.device))

    @contextlib.contextmanager
    def _on_step_stream(self):
        """Where steps and what follows them (rows leaving, rows moving down) run: with CUDA graphs the steps' stream,
        after the last change to the batch; else the current stream (eager steps allocate, and memory cached for one
        stream is not reused for another: on an H100 grid, eager steps on their own stream ran out of memory)."""
        if self._stream is None or not self.use_cuda_graphs:
            if self._stream is not None:  # after anything still running there (a capture that failed, say)
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            with torch.inference_mode():
                yield
            return
        if self._changed is not None:
            self._stream.wait_event(self._changed)
            self._changed = None
        with torch.cuda.stream(self._stream), torch.inference_mode():
            yield

    # -- rows -------------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> list[int]:
        return [index for index, row in enumerate(self.rows) if row is not None]

    def free_row(self) -> int | None:
        return next((index for index, row in enumerate(self.rows) if row is None), None)

    def admit(self, samples: list[Prefilled]) -> list[int]:
        """Copy prefilled samples' caches into free rows and pages of the pool (growing it to just what is needed, if
        `reserve` did not); their row indices. All in one go: a grid admits dozens of rows a sample, and on CUDA their
        launches, not their bytes, are the cost, so each layer's keys (and values) of every sample are written in one
        indexed copy. If it fails (out of memory) no sample is admitted and the pool's pages stay free."""
        with self._changing():
            return self._admit(samples)

    def _admit(self, samples: list[Prefilled]) -> list[int]:
        rows = [index for index, row in enumerate(self.rows) if row is None][: len(samples)]
        if len(rows) < len(samples):
            raise RuntimeError(f"admit() needs {len(samples)} free rows, the batch has {len(rows)}")
        needed = [pages_needed(prefilled) for prefilled in samples]
        needed_steps = max((prefilled.request.max_new_tokens - 1 for prefilled in samples
                            if prefilled.evictions is not None), default=0)
        if max(needed) > self.table_pages or needed_steps > self.steps_capacity:
            self._lengthen(_round_up(max(needed), TABLE_GRANULE), needed_steps)
        evicting = max((count for prefilled, count in zip(samples, needed) if prefilled.evictions is not None),
                       default=0)
        if evicting > self.evict_table_pages:
            self._drop_graphs()  # captured steps evict over the old width
            self.evict_table_pages = _round_up(evicting, TABLE_GRANULE)
        self.reserve(self.pages_in_use() + sum(needed))
        # the lowest free pages, taken from the free list only once the copies are done
        taken = self.free_pages[len(self.free_pages) - sum(needed):][::-1]
        with torch.inference_mode():
            try:
                self._write_rows(samples, rows, needed, taken)
            except BaseException:
                for row in rows:  # a failed admission leaves its rows free, reading and writing the scratch page
                    self._clear_row(row)
                raise
        del self.free_pages[len(self.free_pages) - len(taken):]
        first = 0
        for row, prefilled, count in zip(rows, samples, needed):
            self.row_pages[row] = taken[first: first + count]
            first += count
            prefilled.kept = None  # the batch holds the cache now
            self.rows[row] = Row(prefilled, [prefilled.first_token], time.perf_counter())
        return rows

    def _write_rows(self, samples: list[Prefilled], rows: list[int], needed: list[int], taken: list[int]) -> None:
        """The device side of `admit`: the samples' kept keys and values into pages ``taken`` (each sample its
        ``needed`` ones, in order), their valid bits, page tables, write positions, tokens and eviction schedules.

        Slots past a row's write position are left as they are: they are never read, and the row writes each one
        before it becomes valid."""
        device, count = self.device, len(samples)
        pages = torch.tensor(taken, dtype=torch.long, device=device)
        row_index = torch.tensor(rows, dtype=torch.long, device=device)
        page_counts = torch.tensor(needed, dtype=torch.long, device=device)
        kept_counts = torch.tensor([prefilled.kept_per_layer for prefilled in samples], dtype=torch.long,
                                   device=device)  # (samples, layers)
        # each new page's sample and its place among that sample's pages
        page_sample = torch.repeat_interleave(torch.arange(count, device=device), page_counts, output_size=len(taken))
        first_page = torch.cumsum(page_counts, 0) - page_counts
        page_in_row = torch.arange(len(taken), device=device) - first_page[page_sample]
        # every kept slot of every layer and sample, layer by layer: its page and offset in the pool
        layer_counts = kept_counts.T.reshape(-1)  # (layers x samples), layer-major
        kept_slots = sum(sum(prefilled.kept_per_layer) for prefilled in samples)
        segment = torch.repeat_interleave(torch.arange(layer_counts.numel(), device=device), layer_counts,
                                          output_size=kept_slots)
        slot = torch.arange(kept_slots, device=device) - (torch.cumsum(layer_counts, 0) - layer_counts)[segment]
        slot_pages = pages[first_page[segment % count] + slot // PAGE_SLOTS]
        slot_offsets = slot % PAGE_SLOTS
        first_slot = 0
        for layer in range(self.num_layers):
            layer_slots = sum(prefilled.kept_per_layer[layer] for prefilled in samples)
            at = (slot_pages[first_slot: first_slot + layer_slots], slice(None),
                  slot_offsets[first_slot: first_slot + layer_slots])
            first_slot += layer_slots
            for pool, part in ((self.keys, 0), (self.values, 1)):
                pool[layer][at] = torch.cat([prefilled.kept[layer][part][0].transpose(0, 1) for prefilled in samples])
        page_slots = page_in_row[:, None] * PAGE_SLOTS + torch.arange(PAGE_SLOTS, device=device)
        self.valid[:, pages] = page_slots[None] < kept_counts.T[:, page_sample, None]
        self.page_table[row_index] = EMPTY_PAGE
        self.page_table[row_index[page_sample], page_in_row] = pages
        self.write_pos[:, row_index] = kept_counts.T
        self.tokens[row_index] = torch.tensor([prefilled.first_token for prefilled in samples], device=device)
        self.positions[row_index] = torch.tensor([len(prefilled.request.prompt_ids) for prefilled in samples],
                                                 device=device)
        self.steps_taken[row_index] = 0
        self.live[row_index] = 1
        if self.evictions is not None:
            schedules = torch.full((self.num_layers, count, self.steps_capacity), -1, dtype=torch.int32)
            for sample, prefilled in enumerate(samples):
                if prefilled.evictions is not None:
                    schedule = torch.tensor(prefilled.evictions, dtype=torch.int32)
                    schedules[:, sample, : schedule.shape[1]] = schedule
            self.evictions[:, row_index] = schedules.to(device)

    def _clear_row(self, row: int) -> None:
        """A row leaves: its pages go back to the pool, and as a free row it writes and reads the scratch page
        and stays in place (its write position does not move)."""
        self.free_pages += reversed(self.row_pages[row])
        self.row_pages[row] = []
        self.page_table[row] = SCRATCH_PAGE
        for tensor in (self.tokens, self.positions, self.steps_taken, self.live):
            tensor[row] = 0
        self.write_pos[:, row] = 0
        if self.evictions is not None:
            self.evictions[:, row] = -1  # a free row evicts nothing

    def requeue_rows_from(self, first_row: int) -> list[Prefilled]:
        """Take rows ``first_row`` and beyond out of the batch unfinished (their samples must be redone)."""
        taken = []
        with self._changing():
            for index in range(first_row, len(self.rows)):
                if self.rows[index] is not None:
                    taken.append(self.rows[index].prefilled)
                    self.rows[index] = None
                    self._clear_row(index)
        return taken

    def shrink(self, rows: int) -> None:
        """Keep only the first ``rows`` rows (the caller requeued the others), in a pool of just their pages: moved
        to the front in row order, then each layer's pool cut to that size.

        It runs when memory ran out, so whatever it needs is allocated before anything changes (one layer's live
        pages as a buffer, the rows' new state); the pages then move through the buffer, and the layers are cut one
        by one: running out of memory there leaves the layers not yet cut longer than needed, every page already at
        its new number in all of them."""
        with self._changing():
            self._drop_graphs()  # captured steps read the old tensors
            live = [page for own in self.row_pages[:rows] for page in own]
            pages = FIRST_ROW_PAGE + len(live)
            renumbered, next_page = [], FIRST_ROW_PAGE
            for own in self.row_pages[:rows]:
                renumbered.append(list(range(next_page, next_page + len(own))))
                next_page += len(own)
            page_table = torch.full((rows, self.table_pages), EMPTY_PAGE, dtype=torch.long)
            for row, own in enumerate(renumbered):
                if own:
                    page_table[row, : len(own)] = torch.tensor(own)
                else:
                    page_table[row] = SCRATCH_PAGE
            page_table = page_table.to(self.device)
            kept_state = [tensor[:rows].clone() for tensor in (self.tokens, self.positions, self.steps_taken, self.live)]
            write_pos = self.write_pos[:, :rows].clone()
            evictions = self.evictions[:, :rows].clone() if self.evictions is not None else None
            source = torch.tensor(live, dtype=torch.long, device=self.device)
            moved = slice(FIRST_ROW_PAGE, pages)
            moved_valid = self.valid[:, source]
            buffer = torch.empty((len(live), *self.keys[0].shape[1:]), dtype=self.dtype, device=self.device)
            # nothing is allocated from here until the batch is whole again
            for pool in (self.keys, self.values):
                for layer in range(self.num_layers):
                    torch.index_select(pool[layer], 0, source, out=buffer)
                    pool[layer][moved].copy_(buffer)
            self.valid[:, moved] = moved_valid
            del buffer, moved_valid
            self.rows, self.row_pages = self.rows[:rows], renumbered
            self.free_pages = list(range(pages - 1, next_page - 1, -1))  # popped from the end: lowest first
            self.page_table, self.write_pos, self.evictions = page_table, write_pos, evictions
            self.tokens, self.positions, self.steps_taken, self.live = kept_state
            self.row_index = self.row_index[:rows].clone()
            self.pages = pages
            self.valid = self.valid[:, :pages].clone()
            for pool in (self.keys, self.values):
                for layer in range(self.num_layers):
                    pool[layer] = pool[layer][:pages].clone()

    def compact(self) -> None:
        """Move the active rows to the lowest indices, so that steps run on the smallest bucket (their pages
        stay where they are: only the page tables and the rows' state move)."""
        with self._changing():
            self._compact()

    def _compact(self) -> None:
        active = self.active_rows
        for target, source in enumerate(active):
            if target == source:
                continue
            with torch.inference_mode():
                self.page_table[target] = self.page_table[source]
                self.write_pos[:, target] = self.write_pos[:, source]
                for tensor in (self.tokens, self.positions, self.steps_taken, self.live):
                    tensor[target] = tensor[source]
                if self.evictions is not None:
                    self.evictions[:, target] = self.evictions[:, source]
                self.row_pages[target], self.row_pages[source] = self.row_pages[source], []
                self._clear_row(source)
            self.rows[target], self.rows[source] = self.rows[source], None

    # -- the step -----------------------------------------------------------------------------------------

    def bucket(self) -> int:
        """Rows a step runs on: `step_rows` of the highest active row."""
        return step_rows(max(self.active_rows) + 1, len(self.rows))

    def valid_slots(self, rows: int, entries: int | None = None) -> torch.Tensor:
        """(layers, rows, entries x PAGE_SLOTS) bool: the first ``rows`` rows' valid bits in slot order, over their
        first ``entries`` page-table entries (all of them if None)."""
        return self.valid[:, self.page_table[:rows, :entries]].flatten(2)

    def evict(self, rows: int) -> None:
        """Clear, in each layer and row, the valid slot the schedule names for this step: the
        (index + 1)-th valid slot is the index-th entry of the shifted cache. Over the first `evict_table_pages`
        entries of the page tables, which hold every slot of a row that evicts."""
        step_index = self.steps_taken[:rows].clamp(max=self.steps_capacity - 1)
        index = self.evictions[:, :rows].gather(2, step_index.view(1, rows, 1).expand(self.num_layers, rows, 1))
        # only as far as the longest evicting row: a row that evicts nothing (index -1) is never cut short, as no
        # valid slot has rank 0
        valid = self.valid_slots(rows, self.evict_table_pages)
        rank = valid.cumsum(dim=-1, dtype=torch.int32)
        target = (rank == index + 1) & valid
        slot = target.to(torch.uint8).argmax(dim=-1)  # (layers, rows); 0 where nothing is evicted
        evicted = target.any(dim=-1)
        # nothing to evict: clear the empty page's first bit, which is clear already
        page = torch.where(evicted, self.page_table[self.row_index[:rows], slot // PAGE_SLOTS], EMPTY_PAGE)
        offset = torch.where(evicted, slot % PAGE_SLOTS, 0)
        layer = torch.arange(self.num_layers, device=self.device)[:, None]
        self.valid[layer, page, offset] = self._false

    def session(self, rows: int) -> DecodeSession:
        """The first ``rows`` rows' part of a decode step: their page tables, and where each writes this step."""
        write_pos = self.write_pos[:, :rows]
        write_pages = self.page_table[self.row_index[:rows], write_pos // PAGE_SLOTS]
        return DecodeSession(self.keys, self.values, self.valid, self.page_table[:rows], write_pos, write_pages,
                             write_pos % PAGE_SLOTS, self.batch_invariant)

    def logits(self, rows: int) -> torch.Tensor:
        """Evict what each row's schedule says, then run the model on the first ``rows`` rows' next token:
        logits (rows, vocab). Writes the tokens' keys and values into the pool; `advance` moves on."""
        if self.evictions is not None:
            self.evict(rows)
        session = self.session(rows)
        cache = {self._cache_keyword: StepCache(session, self._true)}
        kernels = invariant_forwards(self.model) if self.batch_invariant else contextlib.nullcontext()
        with active(self.model, session), kernels:
            output = self.model(input_ids=self.tokens[:rows].view(rows, 1),
                                position_ids=self.positions[:rows].view(rows, 1),
                                attention_mask=self._short_circuit_mask, use_cache=True, logits_to_keep=1, **cache)
        return output.logits[:, -1]

    def advance(self, rows: int, next_tokens: torch.Tensor) -> None:
        """After a step: the first ``rows`` rows' next input tokens; each active row one position and slot further
        on (a free row stays at its scratch slot)."""
        live = self.live[:rows]
        self.tokens[:rows] = next_tokens
        self.positions[:rows] += live
        self.steps_taken[:rows] += live
        self.write_pos[:, :rows] += live

    def step_state(self) -> tuple[torch.Tensor, ...]:
        """What a step changes besides the pool's keys and values (a capture's warm-up steps are undone through
        it)."""
        return self.valid, self.write_pos, self.tokens, self.positions, self.steps_taken

    def _take_tokens(self, tokens: list[int], cost_seconds: float) -> list[FinishedRow]:
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

    def _eager_step(self, rows: int) -> torch.Tensor:
        next_tokens = self.logits(rows).argmax(dim=-1)
        self.advance(rows, next_tokens)
        return next_tokens

    def _captured_step(self, rows: int) -> torch.Tensor | None:
        global _capture_failure_said
        key = (rows, self.evictions is not None)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(rows)
            except Exception as error:  # any capture failure: fall back to eager steps, said once a process
                self.use_cuda_graphs = False
                if not _capture_failure_said:
                    log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly",
                                error_line(error))
                    _capture_failure_said = True
                return None
        graph, output = self._graphs[key]
        graph.replay()
        return output

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        started = time.perf_counter()
        state = [tensor.clone() for tensor in self.step_state()]
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(SPARE_SLOTS):  # warm-up: allocations and lazy initialisation happen outside the graph
                    self._eager_step(rows)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(state)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # one pool for every bucket: steps never overlap
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool), torch.inference_mode():
                output = self._eager_step(rows)
        finally:  # also when the warm-up or the capture fails (out of memory, say): the rows go on from where they were
            self._restore(state)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
        return graph, output

    def _restore(self, state: list[torch.Tensor]) -> None:
        for tensor, before in zip(self.step_state(), state):
            tensor.copy_(before)

    @property
    def in_flight(self) -> bool:
        """A step was launched and not yet collected."""
        return self._in_flight is not None

    def launch(self, replay_only: bool = False) -> bool:
        """Start a decode step for every active row (on CUDA returning at once); whether one started. With
        ``replay_only`` only a step that replays a graph already captured, as the prefill launches them between its
        layers (a capture would synchronize the device and take memory): the smallest that holds the rows where they
        are, else, once they moved down, the smallest that holds them."""
        if self._in_flight is not None:
            raise RuntimeError("a decode step is already in flight: collect it first")
        active_rows = self.active_rows
        active = len(active_rows)
        if not active:
            return False
        if replay_only:  # the smallest captured step that holds the rows, moved down only if none holds them as they are
            rows = self._captured_bucket(max(active_rows) + 1)
            compacting = rows is None
            if compacting:
                rows = self._captured_bucket(active)
            if rows is None:
                return False
        else:
            # rows that finished left gaps below the highest: a smaller bucket holds the rest once they move down
            compacting = step_rows(active, len(self.rows)) < self.bucket()
        with self._on_step_stream():
            if compacting:
                self._compact()
            if not replay_only:
                rows = self.bucket()
            launched_at = time.perf_counter()
            output = self._captured_step(rows) if self.use_cuda_graphs else None
            if output is None:
                output = self._eager_step(rows)
            self._host_tokens[:rows].copy_(output, non_blocking=True)
            done = None
            if self._stream is not None:
                done = torch.cuda.Event()
                done.record()  # on the stream the step ran on
        self._in_flight = StepInFlight(rows, active, launched_at, done)
        return True

    def _captured_bucket(self, rows: int) -> int | None:
        """The fewest rows, at least ``rows``, of a step already captured for the batch's eviction (None: none)."""
        if not self.use_cuda_graphs:
            return None
        evicting = self.evictions is not None
        return min((bucket for bucket, evicts in self._graphs if evicts == evicting and bucket >= rows), default=None)

    def collect(self, wait: bool) -> bool:
        """Take the tokens of the step in flight, if there is one and it is done (``wait``: wait for it): the rows
        that finished leave the batch, into `finished`. Whether a step was collected."""
        flight = self._in_flight
        if flight is None or (flight.done is not None and not wait and not flight.done.query()):
            return False
        if flight.done is not None:
            flight.done.synchronize()
        self._in_flight = None
        tokens = self._host_tokens[: flight.rows].tolist()
        self.steps += 1
        self.row_steps += flight.active
        with self._on_step_stream():  # the finished rows' clearing follows the step on its stream
            self.finished += self._take_tokens(tokens, (time.perf_counter() - flight.launched_at) / flight.active)
        return True

    def take_finished(self) -> list[FinishedRow]:
        """The rows finished since the last call."""
        finished, self.finished = self.finished, []
        return finished

    def step(self) -> list[FinishedRow]:
        """One decode step for every active row (the one in flight, if one is); the rows that finished since the last
        `take_finished` (and left the batch)."""
        if self._in_flight is None:
            self.launch()
        self.collect(wait=True)
        return self.take_finished()


_capture_failure_said = False


def step_rows(rows: int, max_rows: int) -> int:
    """The bucket a step over ``rows`` rows runs on, at most ``max_rows``: a power of two up to BUCKET_STEP rows, a
    multiple of it beyond (each bucket is a CUDA graph of its own)."""
    if rows <= BUCKET_STEP:
        return min(max_rows, 1 << math.ceil(math.log2(rows)))
    return min(max_rows, _round_up(rows, BUCKET_STEP))


def _round_up(value: int, step: int) -> int:
    """The least multiple of ``step`` that is at least ``value``."""
    return -(-value // step) * step


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


def synthetic_batch(model, rows: int, kept: list[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int,
                    **options) -> DecodeBatch:
    """A decode batch (``options`` as `DecodeBatch` takes them) of ``rows`` rows, each a copy of ``kept``, in a pool
    allocated once."""
    batch = DecodeBatch(model, rows, **options)
    batch.admit([synthetic_prefilled(kept, max_new_tokens) for _ in range(rows)])
    return batch


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
            batch = synthetic_batch(model, rows, kept, steps + 3, batch_invariant=batch_invariant)
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


def pages_needed(prefilled: Prefilled) -> int:
    """Pages of the pool a sample's row takes (`slots_needed`, in whole pages)."""
    return -(-slots_needed(prefilled) // PAGE_SLOTS)
