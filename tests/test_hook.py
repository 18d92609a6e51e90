"""The compression hook and decode loop on tiny random Llama, Mistral and Qwen2 models."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import repeat_kv

from kvbench.engine.decode import DecodeBatch
from kvbench.engine.generate import as_compressor, generate_greedy
from kvbench.engine.prefill import DecodeRequest, prefill
from kvbench.methods import build_method
from kvbench.methods.pyramidkv import pyramid_prefix_budget
from tests.method_helpers import RecordingCompressor
from tests.tiny_models import FAMILIES, random_prompt, tiny_model

NEW_TOKENS = 12


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fullkv_reproduces_generate_token_for_token(family):
    model = tiny_model(family)
    prompt = random_prompt(80)
    expected = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt):].tolist()
    generation = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, eos_token_ids=set())
    assert generation.token_ids == expected
    assert generation.kept_per_layer == [80] * 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method_name", ["snapkv", "pyramidkv"])
def test_capacity_at_least_the_prompt_equals_fullkv(family, method_name):
    model = tiny_model(family)
    prompt = random_prompt(40)
    full = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, set())
    for capacity in (40, 64):
        method = build_method(method_name, capacity=capacity)
        assert generate_greedy(model, prompt, method, NEW_TOKENS, set()).token_ids == full.token_ids


def test_each_layer_holds_exactly_its_budget_after_prefill():
    model = tiny_model("llama", num_layers=4)
    prompt = random_prompt(200)
    snap = generate_greedy(model, prompt, build_method("snapkv", capacity=32), 1, set())
    assert snap.kept_per_layer == [32] * 4
    pyramid = generate_greedy(model, prompt, build_method("pyramidkv", capacity=64, window_size=8), 1, set())
    expected = [pyramid_prefix_budget(64, 8, 20, layer, 4, 200) + 8 for layer in range(4)]
    assert pyramid.kept_per_layer == expected
    assert expected[0] > expected[-1]


def test_compression_really_changes_the_output():
    model = tiny_model("llama")
    prompt = random_prompt(300)
    full = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, set())
    tiny_budget = generate_greedy(model, prompt, build_method("snapkv", capacity=16), NEW_TOKENS, set())
    assert tiny_budget.token_ids != full.token_ids
    assert tiny_budget.kv_cache_bytes * 300 == full.kv_cache_bytes * 16


def masked_last_row_attention(kept_by_layer, prompt_length):
    """Eager attention over prompt + one new token where the new token may only see, in each layer and
    KV head, the prompt positions that layer kept (and itself): compression computed by hand."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        length = key.shape[2]
        allowed = torch.ones(key.shape[1], length, length, dtype=torch.bool).tril()
        last_row = torch.zeros(key.shape[1], length, dtype=torch.bool)
        last_row[:, prompt_length:] = True
        for kv_head, positions in enumerate(kept_by_layer[module.layer_idx]):
            last_row[kv_head, positions] = True
        allowed[:, -1, :] = last_row
        allowed = allowed.repeat_interleave(groups, dim=0)
        scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
        scores = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return torch.matmul(scores, repeat_kv(value, groups)).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoding_logits_equal_attention_over_the_kept_keys_at_original_positions(family):
    model = tiny_model(family, attn="sdpa")
    prompt = random_prompt(120, seed=3)
    method = RecordingCompressor(as_compressor(build_method("snapkv", capacity=24, window_size=4, kernel_size=3), model))
    next_token = 7

    prefilled = prefill(model, method, DecodeRequest(prompt, 2, set()))
    batch = DecodeBatch(model, max_rows=2)
    batch.admit([prefilled])
    batch.tokens[0] = next_token
    with torch.inference_mode():
        hooked = batch.logits(1)[0]
    assert batch.valid_slots(1)[:, 0].sum(dim=-1).tolist() == [24 + 1] * 4  # the kept prompt and the new token

    AttentionInterface.register("by_hand", masked_last_row_attention({layer: selection.indices[0] for layer, selection in method.selections.items()}, 120))
    AttentionMaskInterface.register("by_hand", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.set_attn_implementation("by_hand")
    with torch.inference_mode():
        by_hand = model(input_ids=torch.tensor([prompt + [next_token]]), use_cache=False).logits[0, -1]
    torch.testing.assert_close(hooked, by_hand, rtol=1e-4, atol=1e-4)


def test_eager_backend_with_uneven_layer_lengths_decodes():
    model = tiny_model("llama", attn="eager")
    prompt = random_prompt(150)
    generation = generate_greedy(model, prompt, build_method("pyramidkv", capacity=32), NEW_TOKENS, set())
    assert len(generation.token_ids) == NEW_TOKENS
    assert len(set(generation.kept_per_layer)) > 1


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    prompt = random_prompt(30)
    free = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, set())
    stop_token = free.token_ids[3]
    first_stop = free.token_ids.index(stop_token)
    stopped = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, {stop_token})
    assert stopped.token_ids == free.token_ids[: first_stop + 1]


def test_stored_entries_are_each_configurations_own_choice():
    """A layer's entries for configurations that keep everything, merge, or choose positions (gathered together):
    each configuration stores exactly what it chose, head by head."""
    from kvbench.engine.hook import stored_entries
    from kvbench.methods.base import Selection

    generator = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 1, 2, 10, 4, generator=generator)
    merged = Selection(indices=torch.tensor([[[0, 1], [0, 1]]]), keys=torch.ones(1, 2, 2, 4),
                       values=torch.zeros(1, 2, 2, 4))
    per_head = torch.tensor([[[1, 4, 9], [0, 2, 3]]])  # each KV head its own positions
    same_positions = torch.tensor([5, 6]).view(1, 1, -1).expand(1, 2, -1)
    stored = stored_entries(key, value, [None, Selection(per_head), merged, Selection(same_positions)])
    assert stored[0][0] is key and stored[0][1] is value
    for (keys, values), positions in ((stored[1], per_head), (stored[3], same_positions)):
        for head in range(2):
            assert torch.equal(keys[0, head], key[0, head, positions[0, head]])
            assert torch.equal(values[0, head], value[0, head, positions[0, head]])
    assert stored[2][0] is merged.keys and stored[2][1] is merged.values
    (only_keys, only_values), = stored_entries(key, value, [Selection(per_head)])
    assert torch.equal(only_keys[0, 1], key[0, 1, [0, 2, 3]]) and only_values.shape == (1, 2, 3, 4)
