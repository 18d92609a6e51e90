"""The decode batch's page pool: each row takes the pages its cache needs and gives them back when it finishes,
so a grid's full-cache and compressed rows decode in one batch at their own cost; every row's tokens stay those
it gives alone, wherever its pages lie and whatever memory allows."""

import pytest
import torch

from kvbench.engine import generate as generate_module
from kvbench.engine.decode import (BUCKET_STEP, FIRST_ROW_PAGE, PAGE_SLOTS, SCRATCH_PAGE, TABLE_GRANULE, DecodeBatch,
                                   pages_needed, step_rows, synthetic_cache, synthetic_prefilled)
from kvbench.engine.generate import StreamStats, as_compressor, generate_stream, pages_within_memory
from kvbench.engine.hook import DecodeSession
from kvbench.engine.invariant_kernels import rows_longest_first
from kvbench.engine.prefill import prefill
from kvbench.methods import build_method
from tests.test_decode import requests_of
from tests.tiny_models import tiny_model

GIB = 2 ** 30

#: prompts and generation lengths: the 300-token prompt's full cache needs 313 slots (5 pages), a SnapKV-16 row 1
LENGTHS, NEW_TOKENS = [90, 30, 300, 64, 200, 140], [10, 3, 12, 6, 9, 4]


def full_cache_and_snapkv():
    return tiny_model("llama", num_layers=2), [build_method("fullkv"), build_method("snapkv", capacity=16)]


def decoded_alone(model, methods) -> dict:
    """Each configuration's tokens decoding each request alone, by (configuration, tag)."""
    return {(configuration, r.tag): r.token_ids for configuration, method in enumerate(methods)
            for r in generate_stream(model, method, requests_of(LENGTHS, NEW_TOKENS), 1)}


def grid_requests(methods):
    requests = requests_of(LENGTHS, NEW_TOKENS)
    for request in requests:
        request.configurations = tuple(range(len(methods)))
    return requests


def decoded_as_a_grid(model, methods, batch_size, **options) -> dict:
    """The configurations' tokens decoding the requests as one grid, by (configuration, tag)."""
    return {(r.configuration, r.tag): r.token_ids
            for r in generate_stream(model, methods, grid_requests(methods), batch_size, **options)}


def test_rows_take_their_own_pages_and_decode_in_one_batch_as_they_would_alone(monkeypatch):
    """Before every step: each active row holds exactly `pages_needed` pages, no page is held twice, the pool's
    count of pages in use is theirs (plus the two no row owns), and rows of both configurations share steps; pages
    freed by finished rows are reused, so some row's pages are not one run in order. Tokens are those alone."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    configurations_a_step, scattered = [], []
    real_step = DecodeBatch.step

    def checking_step(batch):
        held = [page for index in batch.active_rows for page in batch.row_pages[index]]
        assert len(held) == len(set(held)) and batch.pages_in_use() == FIRST_ROW_PAGE + len(held)
        for index in batch.active_rows:
            own = batch.row_pages[index]
            assert len(own) == pages_needed(batch.rows[index].prefilled)
            assert batch.page_table[index, : len(own)].tolist() == own
            scattered.append(own != list(range(own[0], own[0] + len(own))))
        configurations_a_step.append(len({batch.rows[index].prefilled.configuration for index in batch.active_rows}))
        return real_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", checking_step)
    assert decoded_as_a_grid(model, methods, 5) == alone
    assert max(configurations_a_step) == 2
    assert any(scattered)


def test_a_row_takes_whole_pages_for_its_cache_and_marks_only_the_kept_slots_valid():
    model, (_, snapkv) = full_cache_and_snapkv()
    batch = DecodeBatch(model, 2)
    prefilled = prefill(model, as_compressor(snapkv, model), requests_of([100], [70])[0])
    kept_keys = [keys[0].clone() for keys, _ in prefilled.kept]
    [row] = batch.admit([prefilled])
    assert len(batch.row_pages[row]) == pages_needed(prefilled) == -(-(16 + 69 + 2) // PAGE_SLOTS) == 2
    valid = batch.valid_slots(1)[:, row]  # (layers, slots in table order)
    assert valid.sum(dim=-1).tolist() == [16, 16] and bool(valid[:, :16].all())
    first_page = batch.row_pages[row][0]
    for layer, keys in enumerate(kept_keys):
        assert torch.equal(batch.keys[layer][first_page, :, :16], keys)


def test_samples_admitted_together_each_hold_their_own_kept_keys_values_and_valid_slots():
    """One admission of three caches (per-layer budgets, a full cache, a SnapKV one): each row's slots hold its own
    kept keys and values in order, only they are valid, and the rows' pages are their own."""
    model, (fullkv, snapkv) = full_cache_and_snapkv()
    methods = [build_method("pyramidkv", capacity=24), fullkv, snapkv]
    prefilled = [prefill(model, as_compressor(method, model), request)
                 for method, request in zip(methods, requests_of([100, 300, 60], [70, 5, 9]))]
    assert len(set(prefilled[0].kept_per_layer)) == 2  # the layers keep different numbers of tokens
    kept = [[(keys.clone(), values.clone()) for keys, values in one.kept] for one in prefilled]
    batch = DecodeBatch(model, 4)
    rows = batch.admit(prefilled)
    assert rows == [0, 1, 2]
    held = [page for row in rows for page in batch.row_pages[row]]
    assert len(held) == len(set(held)) == sum(pages_needed(one) for one in prefilled)
    for row, one, layers in zip(rows, prefilled, kept):
        table = batch.page_table[row]
        assert table[: len(batch.row_pages[row])].tolist() == batch.row_pages[row]
        assert batch.write_pos[:, row].tolist() == one.kept_per_layer
        assert batch.tokens[row] == one.first_token and batch.positions[row] == len(one.request.prompt_ids)
        for layer, (keys, values) in enumerate(layers):
            slots = torch.arange(keys.shape[-2])
            at = (table[slots // PAGE_SLOTS], slice(None), slots % PAGE_SLOTS)
            assert torch.equal(batch.keys[layer][at], keys[0].transpose(0, 1))
            assert torch.equal(batch.values[layer][at], values[0].transpose(0, 1))
            valid = batch.valid[layer][table].flatten()
            assert bool(valid[: len(slots)].all()) and int(valid.sum()) == len(slots)


def test_an_admission_that_fails_admits_none_of_its_caches_and_keeps_its_pages_free(monkeypatch):
    model, methods = full_cache_and_snapkv()
    prefilled = [prefill(model, as_compressor(method, model), requests_of([90], [10])[0]) for method in methods]
    batch = DecodeBatch(model, 3)
    batch.reserve(FIRST_ROW_PAGE + sum(pages_needed(one) for one in prefilled))
    free_pages = list(batch.free_pages)

    def failing_write(batch, samples, rows, needed, taken):
        batch.page_table[rows] = taken[0]
        batch.live[rows] = 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DecodeBatch, "_write_rows", failing_write)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batch.admit(prefilled)
    assert batch.active_rows == [] and batch.free_pages == free_pages
    assert (batch.page_table == SCRATCH_PAGE).all() and not batch.live.any()


def test_out_of_memory_admitting_a_samples_caches_halves_the_batch_and_redoes_them_once(monkeypatch):
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    real_admit = DecodeBatch.admit
    failures = []

    def admit_failing_once_rows_decode(batch, samples):
        if batch.active_rows and not failures:
            failures.append(len(samples))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_admit(batch, samples)

    monkeypatch.setattr(DecodeBatch, "admit", admit_failing_once_rows_decode)
    results = list(generate_stream(model, methods, grid_requests(methods), 4))
    assert failures == [2]  # a sample's two configurations, admitted together
    assert len(results) == len(alone)
    assert {(r.configuration, r.tag): r.token_ids for r in results} == alone


def test_growing_the_pool_keeps_every_page_at_its_number_even_when_it_fails_part_way(monkeypatch):
    model, methods = full_cache_and_snapkv()
    prefilled = [prefill(model, as_compressor(method, model), request)
                 for method, request in zip(methods, requests_of([300, 90], [10, 10]))]
    batch = DecodeBatch(model, 2)
    rows = batch.admit(prefilled)
    pages_before, row_pages = batch.pages, [list(batch.row_pages[row]) for row in rows]
    contents = [(keys.clone(), values.clone()) for keys, values in zip(batch.keys, batch.values)]
    grown = batch.pages + 7
    real_zeros, calls = torch.zeros, []

    def zeros_failing_on_the_third_layer_pool(*shape, **kwargs):  # the keys' two layers grow, the values' first fails
        if shape and shape[0] == (grown, *batch.keys[0].shape[1:]):
            calls.append(1)
            if len(calls) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros_failing_on_the_third_layer_pool)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batch.reserve(grown)
    assert batch.pages == pages_before and [len(batch.keys), len(batch.values)] == [2, 2]
    assert [pool.shape[0] for pool in batch.keys + batch.values] == [grown, grown, pages_before, pages_before]
    batch.reserve(grown)  # the rest of the layers
    assert batch.pages == grown and all(pool.shape[0] == grown for pool in batch.keys + batch.values)
    assert [batch.row_pages[row] for row in rows] == row_pages
    assert sorted(batch.free_pages) == sorted(set(range(FIRST_ROW_PAGE, grown)) - {p for own in row_pages for p in own})
    for (keys, values), new_keys, new_values in zip(contents, batch.keys, batch.values):
        assert torch.equal(new_keys[:pages_before], keys) and torch.equal(new_values[:pages_before], values)


def test_shrinking_moves_the_pages_to_the_front_and_a_cut_failing_part_way_leaves_the_rows_decoding(monkeypatch):
    """Shrinking runs out of memory's way: the rows' pages move to the front in row order, then each layer is cut to
    the new size; when a cut fails (out of memory) part way, the layers not yet cut stay longer, every page already at
    its new number, and the rows decode on as alone."""
    model, methods = full_cache_and_snapkv()
    lengths, new_tokens = [300, 90, 200], [3, 12, 12]
    alone = {r.tag: r.token_ids for r in generate_stream(model, methods[0], requests_of(lengths, new_tokens), 1)}
    compressor = as_compressor(methods[0], model)
    batch = DecodeBatch(model, 3)
    batch.admit([prefill(model, compressor, request) for request in requests_of(lengths, new_tokens)])
    finished = []
    while not finished:  # the 300-token row finishes first: its pages, the lowest, are free
        finished += batch.step()
    assert [row.prefilled.request.tag for row in finished] == [0] and min(batch.free_pages) == FIRST_ROW_PAGE
    live = [page for own in batch.row_pages for page in own]
    contents = [(keys[live].clone(), values[live].clone()) for keys, values in zip(batch.keys, batch.values)]
    valid = batch.valid[:, live].clone()
    pages = FIRST_ROW_PAGE + len(live)
    real_clone, cuts = torch.Tensor.clone, []

    def clone_failing_on_the_third_layer_cut(tensor, *args, **kwargs):  # the keys' two layers are cut, then it fails
        if tensor.dim() == 4 and tensor.shape[0] == pages:
            cuts.append(1)
            if len(cuts) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_clone(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone_failing_on_the_third_layer_cut)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batch.shrink(3)
    monkeypatch.undo()
    assert batch.pages == pages and batch.free_pages == [] and batch.valid.shape[1] == pages
    assert [pool.shape[0] > pages for pool in batch.keys + batch.values] == [False, False, True, True]
    assert [page for own in batch.row_pages for page in own] == list(range(FIRST_ROW_PAGE, pages))
    for (keys, values), new_keys, new_values in zip(contents, batch.keys, batch.values):
        assert torch.equal(new_keys[FIRST_ROW_PAGE:pages], keys) and torch.equal(new_values[FIRST_ROW_PAGE:pages], values)
    assert torch.equal(batch.valid[:, FIRST_ROW_PAGE:pages], valid)
    while batch.active_rows:
        finished += batch.step()
    assert {row.prefilled.request.tag: row.tokens for row in finished} == alone
    batch.reserve(pages + 3)  # growing after it keeps every page at its number
    assert batch.pages == pages + 3 and all(pool.shape[0] >= pages + 3 for pool in batch.keys + batch.values)


def test_a_pool_that_cannot_grow_while_rows_decode_makes_the_caches_wait_not_the_batch_halve(monkeypatch):
    """Free memory in pieces too small for a grown layer (an H100 grid met it): the caches that fit go in, the rest
    wait for pages, and every row decodes as alone."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    real_grow, failures = DecodeBatch._grow, []

    def grow_failing_while_rows_decode(batch, pages):
        if batch.active_rows:
            failures.append(pages)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        real_grow(batch, pages)

    monkeypatch.setattr(DecodeBatch, "_grow", grow_failing_while_rows_decode)
    said = []
    results = list(generate_stream(model, methods, grid_requests(methods), 6, say=said.append))
    assert failures and not any("continuing with" in line for line in said)
    assert any(line.startswith("decode rows bounded by GPU memory") for line in said)
    assert len(results) == len(alone) and {(r.configuration, r.tag): r.token_ids for r in results} == alone


def test_eviction_reads_the_page_tables_only_as_far_as_the_longest_evicting_row(monkeypatch):
    """A full-cache row of 2,200 slots lengthens every page table to 64 entries; Elastic Cache's rows (the ones that
    evict) need one page, so the eviction reads 32 entries, and every row decodes as alone."""
    model = tiny_model("llama", num_layers=2)
    methods = [build_method("fullkv"), build_method("elastic", capacity=16)]
    lengths, new_tokens = [2200, 90], [6, 8]
    alone = {(configuration, r.tag): r.token_ids for configuration, method in enumerate(methods)
             for r in generate_stream(model, method, requests_of(lengths, new_tokens), 1)}
    widths, real_evict = [], DecodeBatch.evict

    def recording_evict(batch, rows):
        widths.append((batch.evict_table_pages, batch.table_pages))
        real_evict(batch, rows)

    monkeypatch.setattr(DecodeBatch, "evict", recording_evict)
    requests = requests_of(lengths, new_tokens)
    for request in requests:
        request.configurations = (0, 1)
    results = {(r.configuration, r.tag): r.token_ids for r in generate_stream(model, methods, requests, 4)}
    assert results == alone
    assert widths and set(widths) == {(TABLE_GRANULE, 2 * TABLE_GRANULE)}


def test_admitting_a_longer_evicting_row_widens_the_eviction_and_drops_the_captured_steps():
    model, _ = full_cache_and_snapkv()
    batch = DecodeBatch(model, 2)
    long_row = synthetic_prefilled(synthetic_cache(model, TABLE_GRANULE * PAGE_SLOTS + 10), 4)
    long_row.evictions = [[-1] * 3 for _ in range(2)]
    batch._graphs[(1, True)], batch._graph_pool = ("graph", "output"), ("pool", 0)
    batch.admit([long_row])
    assert batch.evict_table_pages == 2 * TABLE_GRANULE and batch._graphs == {} and batch._graph_pool is None


def test_stream_stats_count_each_decoded_token_once():
    model, methods = full_cache_and_snapkv()
    stats = StreamStats()
    generations = list(generate_stream(model, methods, grid_requests(methods), 3, stats=stats))
    # a step gives each of its active rows one token; the first token is the prefill's
    assert stats.row_steps == sum(len(generation.token_ids) - 1 for generation in generations)
    assert max(NEW_TOKENS) - 1 <= stats.steps <= sum(NEW_TOKENS) * 2
    assert stats.captures == 0 and stats.capture_seconds == 0  # on the CPU steps run eagerly
    assert stats.prefill_seconds > 0 and stats.step_seconds > 0 and stats.admit_seconds > 0


def test_steps_run_on_a_power_of_two_of_rows_then_on_multiples_of_the_bucket_step():
    assert [step_rows(rows, 512) for rows in (1, 3, 33, 64, 65, 128, 130, 286, 431, 500)] == [
        1, 4, 64, 64, 128, 128, 192, 320, 448, 512]
    assert step_rows(286, 300) == 300  # never more than the batch holds
    assert BUCKET_STEP == 64


def test_every_step_runs_on_the_smallest_bucket_its_active_rows_need_and_tokens_stay_those_alone(monkeypatch):
    """Rows finishing out of order leave gaps below the highest active row; the step first moves the rows down, so
    it runs on `step_rows` of how many rows are active, not of where the highest one lies."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    steps, compactions = [], []
    real_eager_step, real_compact = DecodeBatch._eager_step, DecodeBatch._compact

    def recording_eager_step(batch, rows):
        steps.append((rows, len(batch.active_rows), max(batch.active_rows) + 1))
        return real_eager_step(batch, rows)

    def recording_compact(batch):
        compactions.append(1)
        real_compact(batch)

    monkeypatch.setattr(DecodeBatch, "_eager_step", recording_eager_step)
    monkeypatch.setattr(DecodeBatch, "_compact", recording_compact)
    assert decoded_as_a_grid(model, methods, 6) == alone
    assert all(rows == step_rows(active, 6) and highest <= rows for rows, active, highest in steps)
    assert compactions and any(rows < 6 for rows, _, _ in steps)


def test_growing_the_pool_or_a_page_table_drops_the_captured_steps_and_their_memory_pool():
    """Captured steps read the old tensors, and CUDA's caching allocator asserts when a capture shares the memory
    pool of graphs that are all gone (an H100 run showed it): both go, so the next capture makes a new pool."""
    model, _ = full_cache_and_snapkv()
    batch = DecodeBatch(model, 2)
    for grow in (lambda: batch.reserve(batch.pages * 2), lambda: batch._lengthen(batch.table_pages * 2, 0)):
        batch._graphs[(1, False)], batch._graph_pool = ("graph", "output"), ("pool", 0)
        grow()
        assert batch._graphs == {} and batch._graph_pool is None


def test_pages_within_memory_leave_the_next_prefill_and_the_growth_margin():
    page = 2 * 32 * 8 * PAGE_SLOTS * 128 * 2  # Llama-3-8B in bf16: 8 MiB a page over its 32 layers
    margin = generate_module.GROWTH_MARGIN
    assert pages_within_memory(10 * GIB, 0, 0, page) == int(10 * GIB / margin // page)
    # the present pool counts as available (it is copied into the new one), the next prefill's room does not
    assert pages_within_memory(8 * GIB, 2 * GIB, 5 * GIB, page) == int(5 * GIB / margin // page)
    assert pages_within_memory(GIB, 0, 2 * GIB, page) <= 0


def test_caches_that_memory_cannot_hold_wait_for_pages_and_the_pool_stays_within_it(monkeypatch):
    """Simulated memory of 8 pages (less than the grid's rows of one sample need at once): the pool never grows
    past it while rows decode, waiting is said once, and every row still gets the tokens it gives alone."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    memory_pages, pool_sizes = 8, []
    real_step = DecodeBatch.step

    def recording_step(batch):
        pool_sizes.append(batch.pages)
        return real_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", recording_step)
    monkeypatch.setattr(generate_module, "_pool_pages", lambda batch, required, room: min(required * 2, memory_pages))
    said = []
    assert decoded_as_a_grid(model, methods, 6, say=said.append) == alone
    assert max(pool_sizes) == memory_pages
    assert len(said) == 1 and said[0].startswith("decode rows bounded by GPU memory: ")


def test_memory_that_holds_a_prefill_only_while_nothing_decodes_still_finishes_every_row(monkeypatch):
    """Every prefill runs out of memory while any row decodes: the pool first drops its free pages, then the batch
    is halved and the sample redone after a decode step, so the rows drain, the sample is prefilled alone, and
    nothing is lost or repeated (no loop of retries without a step between them)."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    batches, shrunk = [], []
    real_admit, real_prefill, real_shrink = DecodeBatch.admit, generate_module.prefill_shared, DecodeBatch.shrink

    def recording_admit(batch, prefilled):
        if batch not in batches:
            batches.append(batch)
        return real_admit(batch, prefilled)

    def recording_shrink(batch, rows):
        shrunk.append((rows, batch.pages_in_use()))
        real_shrink(batch, rows)
        assert batch.pages == batch.pages_in_use()  # a pool of just the rows' own pages

    attempts = []

    def prefill_only_when_idle(*args, **kwargs):
        attempts.append(any(batch.active_rows for batch in batches))
        if attempts.count(True) > 50:
            pytest.fail("prefill retried again and again without a decode step between")
        if attempts[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(DecodeBatch, "admit", recording_admit)
    monkeypatch.setattr(DecodeBatch, "shrink", recording_shrink)
    monkeypatch.setattr(generate_module, "prefill_shared", prefill_only_when_idle)
    assert decoded_as_a_grid(model, methods, 4) == alone
    assert any(attempts) and shrunk  # it did run out of memory, and gave pages back


def test_cpu_attention_over_rows_of_very_different_lengths_is_each_rows_own_softmax():
    """Rows 5, 1 and 3 pages long (on the CPU the 5- and 3-page rows gather together, up to 5 pages, the other
    alone): each query head attends to exactly its row's valid slots up to the write position, through its KV head,
    as a per-row softmax computed slot by slot gives."""

    torch.manual_seed(0)
    heads, kv_heads, dim, scaling = 4, 2, 8, 0.3
    key_pages, value_pages = torch.randn(10, kv_heads, PAGE_SLOTS, dim), torch.randn(10, kv_heads, PAGE_SLOTS, dim)
    table = torch.tensor([[3, 7, 1, 9, 4], [5, 0, 0, 0, 0], [2, 8, 6, 0, 0]])
    write_pos = torch.tensor([4 * PAGE_SLOTS + 10, 20, 2 * PAGE_SLOTS + 5])
    valid = torch.rand(10, PAGE_SLOTS) > 0.3
    for row, last in enumerate(write_pos.tolist()):  # nothing valid after a row's write position
        for slot in range(last + 1, table.shape[1] * PAGE_SLOTS):
            valid[table[row, slot // PAGE_SLOTS], slot % PAGE_SLOTS] = False
    valid[table[1, 0], 3] = True  # every row has a valid slot
    session = DecodeSession([key_pages], [value_pages], valid[None], table, write_pos[None], None, None)
    query = torch.randn(3, heads, 1, dim)
    output = session.attention(0, query, scaling)
    assert output.shape == (3, 1, heads, dim)
    for row, last in enumerate(write_pos.tolist()):
        slots = [(table[row, slot // PAGE_SLOTS], slot % PAGE_SLOTS) for slot in range(last + 1)
                 if valid[table[row, slot // PAGE_SLOTS], slot % PAGE_SLOTS]]
        for head in range(heads):
            keys = torch.stack([key_pages[page, head // 2, offset] for page, offset in slots])
            values = torch.stack([value_pages[page, head // 2, offset] for page, offset in slots])
            expected = torch.softmax(keys @ query[row, head, 0] * scaling, dim=0) @ values
            # fp32 sums of at most 330 terms: a few ulps of values of order one
            torch.testing.assert_close(output[row, 0, head], expected, rtol=1e-5, atol=1e-5)


def test_the_gpu_grid_step_script_runs_on_a_tiny_model():
    """tests/gpu/grid_step.py's measurement, on CPU (eager steps, the plain kernels: the invariant ones are Triton's),
    so that it works on its first GPU run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("grid_step_gpu", Path(__file__).parent / "gpu" / "grid_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, _ = full_cache_and_snapkv()
    table = script.measure(model, [(1, 130), (3, 20)], [4, 8], steps=2, batch_invariant=False)
    assert table.bucket.tolist() == [4, 8] and (table.active_rows == 4).all()
    assert not table.cuda_graph.any() and (table.ms_per_step > 0).all()
    with pytest.raises(ValueError, match="cannot hold 4 active rows"):
        script.measure(model, [(1, 130), (3, 20)], [2], steps=1, batch_invariant=False)


def test_rows_decoding_between_a_prefills_layers_give_the_tokens_they_give_alone(monkeypatch):
    """What a CUDA run does with captured steps (a step launched after each layer of the next sample's prefill and
    collected at a later one, rows finishing mid-prefill, admissions collecting the step in flight), here with eager
    steps on the CPU: each row's tokens are those it gives alone, each token is counted once, and steps did run
    during the prefills."""
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    real_launch = DecodeBatch.launch
    monkeypatch.setattr(DecodeBatch, "launch", lambda batch, replay_only=False: real_launch(batch))
    stats = StreamStats()
    assert decoded_as_a_grid(model, methods, 4, stats=stats) == alone
    assert stats.steps_in_prefill > 0
    assert stats.row_steps == sum(len(tokens) - 1 for tokens in alone.values())


def test_a_change_to_the_batch_collects_the_step_in_flight_first():
    """Admitting a sample while a step is in flight: the step's tokens are taken first (its finished rows kept until
    asked for), so the new row starts from its own first token and the others go on where they were."""
    model, _ = full_cache_and_snapkv()
    kept = synthetic_cache(model, 40)
    batch = DecodeBatch(model, 3)
    batch.admit([synthetic_prefilled(kept, 2), synthetic_prefilled(kept, 5)])
    assert batch.launch() and batch.in_flight
    with pytest.raises(RuntimeError, match="in flight"):
        batch.launch()
    batch.admit([synthetic_prefilled(kept, 5)])
    assert not batch.in_flight and batch.steps == 1
    finished = batch.take_finished()
    assert [len(row.tokens) for row in finished] == [2]  # the two-token row finished in the collected step
    assert sorted(len(batch.rows[index].tokens) for index in batch.active_rows) == [1, 2]  # new row, old row
    assert not batch.launch(replay_only=True)  # nothing captured on the CPU: no step between a prefill's layers


def test_the_paged_kernel_launches_the_longest_rows_first_ties_in_row_order():
    write_pos = torch.tensor([[3, 7, 7, 1], [0, 0, 5, 0]])
    assert rows_longest_first(write_pos).tolist() == [[1, 2, 0, 3], [2, 0, 1, 3]]
