"""Decode lanes: rows decode in batches by the slots they need, so a grid's compressed rows do not get buffers
as long as its full-cache rows; every row's tokens stay those it gives alone, whatever memory allows."""

import pytest
import torch

from kvbench.engine import generate as generate_module
from kvbench.engine.decode import DecodeBatch, JointStep, slots_needed
from kvbench.engine.generate import Lane, StreamStats, generate_stream, lane_class, rows_within_memory
from kvbench.methods import build_method
from tests.test_decode import requests_of
from tests.tiny_models import tiny_model

GIB = 2 ** 30


def test_lane_classes_grow_by_the_ratio():
    base, ratio = generate_module.LANE_BASE_SLOTS, generate_module.LANE_RATIO
    assert [lane_class(slots) for slots in (1, base, base + 1, base * ratio, base * ratio + 1)] == [0, 0, 1, 1, 2]


def test_lanes_split_memory_so_each_keeps_as_many_samples_in_flight():
    """The papers' grid on an 8k prompt: one full-cache row of 8,448 slots and 28 compressed rows of 1,536 a
    sample. Each lane's share of 100 GiB is its demand's; both then hold the rows of about 17 samples."""
    long_lane, short_lane = Lane(None, caches_seen=1, most_slots=8448), Lane(None, caches_seen=28, most_slots=1536)
    total = long_lane.demand + short_lane.demand
    slot_row_bytes = 2 * 32 * 8 * 128 * 2  # Llama-3-8B in bf16: keys and values of 32 layers, 8 KV heads, d = 128
    rows = [rows_within_memory(100 * GIB, 0, 0, 0, lane.demand / total, lane.most_slots * slot_row_bytes, 4096)
            for lane in (long_lane, short_lane)]
    samples_in_flight = rows[0] / 1, rows[1] / 28
    assert abs(samples_in_flight[0] - samples_in_flight[1]) <= 1
    # together they fill the memory (less the growth margin), with less than a row of each lane to spare
    used = rows[0] * 8448 * slot_row_bytes + rows[1] * 1536 * slot_row_bytes
    assert 100 * GIB / generate_module.GROWTH_MARGIN - used < (8448 + 1536) * slot_row_bytes


def test_a_lane_gets_a_row_beyond_its_share_if_memory_holds_one_and_none_if_not():
    assert rows_within_memory(10 * GIB, 0, 0, 0, share=0.01, per_row=1 * GIB, most_rows=64) == 1
    assert rows_within_memory(GIB // 2, 0, 0, 0, share=1.0, per_row=1 * GIB, most_rows=64) == 0
    # the next prefill's room comes off first
    assert rows_within_memory(10 * GIB, 0, 0, 5 * GIB, share=1.0, per_row=1 * GIB, most_rows=64) == 4


#: the prompts and generation lengths of the lane tests: the 300-token prompt's full cache needs 313 slots
LENGTHS, NEW_TOKENS = [90, 30, 300, 64], [10, 3, 12, 6]


def full_cache_and_snapkv():
    return tiny_model("llama", num_layers=2), [build_method("fullkv"), build_method("snapkv", capacity=16)]


def decoded_alone(model, methods) -> dict:
    """Each configuration's tokens decoding each request alone, by (configuration, tag)."""
    return {(configuration, r.tag): r.token_ids for configuration, method in enumerate(methods)
            for r in generate_stream(model, method, requests_of(LENGTHS, NEW_TOKENS), 1)}


def decoded_as_a_grid(model, methods, batch_size) -> dict:
    """The configurations' tokens decoding the requests as one grid, by (configuration, tag)."""
    requests = requests_of(LENGTHS, NEW_TOKENS)
    for request in requests:
        request.configurations = tuple(range(len(methods)))
    return {(r.configuration, r.tag): r.token_ids for r in generate_stream(model, methods, requests, batch_size)}


def test_full_cache_and_compressed_rows_decode_in_their_own_lanes(monkeypatch):
    monkeypatch.setattr(generate_module, "LANE_BASE_SLOTS", 48)  # SnapKV-16 rows need 16 + 11 + 2 slots at most
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    slots_by_batch, lanes_a_step = {}, []
    real_step = JointStep.step

    def recording_step(joint_step, batches):
        for batch in batches:
            slots_by_batch[id(batch)] = max(slots_by_batch.get(id(batch), 0), batch.slots)
        lanes_a_step.append(sum(bool(batch.active_rows) for batch in batches))
        return real_step(joint_step, batches)

    monkeypatch.setattr(JointStep, "step", recording_step)
    assert decoded_as_a_grid(model, methods, 3) == alone
    # compressed rows (and the 30-token prompt's full cache) in buffers of one granule (SLOT_GRANULE), the other
    # full caches in buffers for the 300-token prompt's 313 slots
    assert sorted(slots_by_batch.values()) == [256, 512]
    # both lanes' rows decoded in the same steps (one forward for both)
    assert max(lanes_a_step) == 2


def test_stream_stats_count_each_decoded_token_once_and_the_steps_both_lanes_shared(monkeypatch):
    monkeypatch.setattr(generate_module, "LANE_BASE_SLOTS", 48)
    model, methods = full_cache_and_snapkv()
    requests = requests_of(LENGTHS, NEW_TOKENS)
    for request in requests:
        request.configurations = (0, 1)
    stats = StreamStats()
    generations = list(generate_stream(model, methods, requests, 3, stats=stats))
    # a step gives each of its active rows one token; the first token is the prefill's
    assert stats.row_steps == sum(len(generation.token_ids) - 1 for generation in generations)
    assert max(NEW_TOKENS) - 1 <= stats.steps <= sum(NEW_TOKENS) * 2
    assert 0 < stats.joint_steps < stats.steps
    assert stats.captures == 0 and stats.capture_seconds == 0  # on the CPU steps run eagerly
    assert stats.prefill_seconds > 0 and stats.step_seconds > 0 and stats.admit_seconds > 0


def test_a_lane_that_memory_cannot_hold_waits_for_the_others_buffers(monkeypatch):
    """Simulated memory that holds one lane's buffers at a time: the other lane's caches wait until nothing
    decodes, the idle buffers go back, the lane then keeps its rows (the memory they held is free), and every
    row still gets the tokens it gives alone."""
    monkeypatch.setattr(generate_module, "LANE_BASE_SLOTS", 48)
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    released, shrunk_to = [], []
    real_release, real_shrink = DecodeBatch.release_buffers, DecodeBatch.shrink

    def recording_release(batch):
        released.append(batch.slots)
        real_release(batch)

    def recording_shrink(batch, rows):
        shrunk_to.append(rows)
        real_shrink(batch, rows)

    monkeypatch.setattr(DecodeBatch, "release_buffers", recording_release)
    monkeypatch.setattr(DecodeBatch, "shrink", recording_shrink)
    monkeypatch.setattr(generate_module, "_rows_that_fit", lambda batch, prefilled, room, share, lanes_bytes:
                        len(batch.rows) if slots_needed(prefilled) <= batch.slots
                        else 0 if lanes_bytes > batch.buffer_bytes() else len(batch.rows))
    assert decoded_as_a_grid(model, methods, 4) == alone
    assert any(slots > 0 for slots in released)
    assert shrunk_to == []


def test_memory_that_holds_a_prefill_only_while_nothing_decodes_still_finishes_every_row(monkeypatch):
    """Every prefill runs out of memory while any row decodes: each time the busiest lane is halved and the sample
    is redone after a decode step, so the rows drain, the sample is prefilled alone, and nothing is lost or
    repeated (no loop of retries without a step between them)."""
    monkeypatch.setattr(generate_module, "LANE_BASE_SLOTS", 48)
    model, methods = full_cache_and_snapkv()
    alone = decoded_alone(model, methods)
    batches = []
    real_admit, real_prefill = DecodeBatch.admit, generate_module.prefill_shared

    def recording_admit(batch, prefilled):
        if batch not in batches:
            batches.append(batch)
        return real_admit(batch, prefilled)

    attempts = []

    def prefill_only_when_idle(*args, **kwargs):
        attempts.append(any(batch.active_rows for batch in batches))
        if attempts.count(True) > 50:
            pytest.fail("prefill retried again and again without a decode step between")
        if attempts[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(DecodeBatch, "admit", recording_admit)
    monkeypatch.setattr(generate_module, "prefill_shared", prefill_only_when_idle)
    assert decoded_as_a_grid(model, methods, 4) == alone
    assert any(attempts)  # it did run out of memory
