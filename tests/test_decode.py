"""The batched decode engine: eviction by masking, and token-for-token equality with decoding one sample alone."""

import pytest
import torch

from kvbench.engine import generate as generate_module
from kvbench.engine.decode import DecodeBatch
from kvbench.engine.generate import generate_greedy, generate_stream
from kvbench.engine.hook import masked_decode_attention
from kvbench.engine.prefill import DecodeRequest
from kvbench.methods import build_method
from tests.method_helpers import recording_graph_captures
from tests.test_method_contract import CONTRACT
from tests.tiny_models import FAMILIES, random_prompt, tiny_model


def dense_attention(query, keys, values, scaling):
    """Attention of one query (Hq, d) over a list of (Hkv, d) entries, GQA by repeating: (Hq, d)."""
    stacked_keys, stacked_values = torch.stack(keys, dim=1), torch.stack(values, dim=1)  # (Hkv, n, d)
    groups = query.shape[0] // stacked_keys.shape[0]
    stacked_keys = stacked_keys.repeat_interleave(groups, dim=0)
    stacked_values = stacked_values.repeat_interleave(groups, dim=0)
    weights = torch.softmax((stacked_keys @ query.unsqueeze(-1)).squeeze(-1) * scaling, dim=-1)
    return (weights.unsqueeze(-1) * stacked_values).sum(dim=1)


def test_evicting_by_masking_a_slot_equals_shifting_the_cache():
    """The fixed-point rule evicts logical index i, again and again, while tokens are appended. Kept as a
    shifted list (the reference) and as slots whose valid bit is cleared (the batch), attention agrees."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, kept, steps = 4, 2, 8, 12, 20
    shifted_keys = [torch.randn(kv_heads, dim, generator=generator) for _ in range(kept)]
    shifted_values = [torch.randn(kv_heads, dim, generator=generator) for _ in range(kept)]
    slots = kept + steps
    buffer_keys = torch.zeros(1, kv_heads, slots, dim)
    buffer_values = torch.zeros(1, kv_heads, slots, dim)
    buffer_keys[0, :, :kept] = torch.stack(shifted_keys, dim=1)
    buffer_values[0, :, :kept] = torch.stack(shifted_values, dim=1)
    valid = torch.zeros(1, slots, dtype=torch.bool)
    valid[0, :kept] = True
    for step in range(steps):
        logical = 5 if step % 3 else kept - 2  # indices inside the kept prompt, later among appended tokens
        logical = min(logical, len(shifted_keys) - 1)
        # the list: drop entry `logical`, the later ones shift left
        del shifted_keys[logical], shifted_values[logical]
        # the buffer: clear the (logical + 1)-th valid slot
        rank = valid.cumsum(dim=-1)
        valid &= ~((rank == logical + 1) & valid)
        new_key, new_value = torch.randn(kv_heads, dim, generator=generator), torch.randn(kv_heads, dim, generator=generator)
        shifted_keys.append(new_key)
        shifted_values.append(new_value)
        buffer_keys[0, :, kept + step] = new_key
        buffer_values[0, :, kept + step] = new_value
        valid[0, kept + step] = True
        query = torch.randn(heads, dim, generator=generator)
        expected = dense_attention(query, shifted_keys, shifted_values, dim**-0.5)
        actual = masked_decode_attention(query.view(1, heads, 1, dim), buffer_keys, buffer_values, valid, dim**-0.5)
        torch.testing.assert_close(actual.view(heads, dim), expected, rtol=1e-5, atol=1e-6)
        # the same entries survive, in the same order
        survivors = buffer_keys[0, :, valid[0]].transpose(0, 1)
        torch.testing.assert_close(survivors, torch.stack(shifted_keys))


def requests_of(lengths, new_tokens, stop_ids=()):
    return [DecodeRequest(random_prompt(length, seed=index + 10), tokens, set(stop_ids), tag=index)
            for index, (length, tokens) in enumerate(zip(lengths, new_tokens))]


def method_for(name):
    options, _ = CONTRACT[name]
    return build_method(name, **options, **({} if name == "fullkv" else {"capacity": 40}))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_batched_decoding_equals_decoding_each_sample_alone(name, family):
    """Mixed prompt lengths (some shorter than the budget), rows finishing at different steps (generation
    lengths and a stop token), more samples than rows (rows join mid-batch), batches of 1, 3 and 8."""
    model = tiny_model(family, num_layers=2)
    method = method_for(name)
    lengths = [90, 30, 120, 64, 45, 100, 75]
    new_tokens = [10, 3, 12, 1, 9, 6, 11]
    alone = [generate_greedy(model, request.prompt_ids, method, request.max_new_tokens, set()).token_ids
             for request in requests_of(lengths, new_tokens)]
    for batch_size in (1, 3, 8):
        results = list(generate_stream(model, method, requests_of(lengths, new_tokens), batch_size))
        assert sorted(result.tag for result in results) == list(range(len(lengths)))
        assert {result.tag: result.token_ids for result in results} == dict(enumerate(alone)), batch_size
    # a token some samples produce mid-generation, as a stop token for all of them
    stop = next(tokens[2] for tokens in alone if len(tokens) > 4)
    stopped = [tokens[: tokens.index(stop) + 1] if stop in tokens else tokens for tokens in alone]
    results = list(generate_stream(model, method, requests_of(lengths, new_tokens, (stop,)), 3))
    assert {result.tag: result.token_ids for result in results} == dict(enumerate(stopped))


def test_samples_leave_as_they_finish():
    model = tiny_model("llama", num_layers=2)
    results = list(generate_stream(model, build_method("snapkv", capacity=32), requests_of([80, 80, 80], [30, 2, 10]), 3))
    assert [result.tag for result in results] == [1, 2, 0]
    assert all(result.decode_cost_seconds <= result.decode_seconds for result in results)


def test_out_of_memory_halves_the_batch_and_loses_or_repeats_nothing(monkeypatch):
    model = tiny_model("llama", num_layers=2)
    method = build_method("pyramidkv", capacity=32)
    lengths, new_tokens = [70, 90, 50, 110, 60, 80], [8, 12, 5, 10, 7, 9]
    expected = {r.tag: r.token_ids for r in generate_stream(model, method, requests_of(lengths, new_tokens), 1)}
    real_step = DecodeBatch.step
    failures = []

    def step_failing_with_many_rows(batch):
        if len(batch.active_rows) > 2 and not failures:
            failures.append(len(batch.rows))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", step_failing_with_many_rows)
    said = []
    results = list(generate_stream(model, method, requests_of(lengths, new_tokens), 4, say=said.append))
    assert failures == [4]
    assert said == ["out of GPU memory with 4 decode rows: continuing with 2"]
    assert sorted(result.tag for result in results) == list(range(6))
    assert {result.tag: result.token_ids for result in results} == expected


def test_out_of_memory_alone_names_the_sample(monkeypatch):
    from kvbench.errors import KvbenchError

    def prefill_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(generate_module, "prefill_shared", prefill_out_of_memory)
    model = tiny_model("llama", num_layers=2)
    request = DecodeRequest(random_prompt(70), 4, set(), sample={"task": "qasper", "_id": "abc"})
    with pytest.raises(KvbenchError, match=r"out of GPU memory prefilling qasper sample abc \(70 prompt tokens\) alone"):
        list(generate_stream(model, build_method("fullkv"), [request], 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fullkv", "snapkv", "pyramidkv", "elastic", "prefixkv", "h2o"])
def test_cuda_graph_steps_equal_eager_steps(name):
    """On the GPU in fp32: the batch decoded through captured CUDA graphs equals each sample decoded
    eagerly alone, token for token (rows joining and leaving, eviction schedules included)."""
    model = tiny_model("llama", num_layers=3).cuda()
    method = method_for(name)
    lengths, new_tokens = [90, 30, 120, 64, 45, 100, 75, 140, 52], [10, 3, 12, 1, 9, 6, 11, 14, 7]
    eager = {r.tag: r.token_ids for r in generate_stream(model, method, requests_of(lengths, new_tokens), 1,
                                                          use_cuda_graphs=False)}
    with recording_graph_captures() as captured:
        graphed = {r.tag: r.token_ids for r in generate_stream(model, method, requests_of(lengths, new_tokens), 4)}
    assert captured, "no CUDA graph was captured"
    assert graphed == eager
