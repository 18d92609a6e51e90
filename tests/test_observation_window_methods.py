"""SnapKV and PyramidKV on hand-built tensors: which positions each KV head keeps."""

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.methods import build_method
from kvbench.methods.base import LayerPrefill
from kvbench.methods.pyramidkv import pyramid_prefix_budget

SHARP = 40.0  # query scale: softmax puts nearly all mass on the largest key


def layer_with_spikes(spikes_per_query_head, kv_heads, length=12, head_dim=4, layer_idx=0, num_layers=1):
    """Queries of head h point along dimension h % head_dim; a key spike (position, dim, height) sets the
    logit that the query heads reading that dimension give to that position. Window keys are zero."""
    query_heads = len(spikes_per_query_head)
    queries = torch.zeros(1, query_heads, length, head_dim)
    keys = torch.zeros(1, kv_heads, length, head_dim)
    groups = query_heads // kv_heads
    for head, spikes in enumerate(spikes_per_query_head):
        dim = head % head_dim
        queries[0, head, :, dim] = SHARP
        for position, height in spikes:
            keys[0, head // groups, position, dim] = height
    values = torch.randn(1, kv_heads, length, head_dim)
    return LayerPrefill(layer_idx, num_layers, queries, keys, values, head_dim**-0.5)


def kept(selection):
    return [row.tolist() for row in selection.indices[0]]


def test_snapkv_keeps_the_most_attended_prefix_tokens_and_the_window():
    layer = layer_with_spikes([[(2, 1.0), (5, 0.8), (7, 0.6), (9, 0.2)]], kv_heads=1)
    method = build_method("snapkv", capacity=5, window_size=2, kernel_size=1)
    assert kept(method.select(layer)) == [[2, 5, 7, 10, 11]]


def test_snapkv_max_pooling_spreads_a_vote_to_the_neighbours():
    # One strong spike at 2 and a weaker one at 7: max pooling over 3 gives 1,2,3 the top vote, 6,7,8 the next.
    layer = layer_with_spikes([[(2, 1.0), (7, 0.5)]], kv_heads=1)
    three = build_method("snapkv", capacity=5, window_size=2, kernel_size=3, pooling="maxpool")
    six = build_method("snapkv", capacity=8, window_size=2, kernel_size=3, pooling="maxpool")
    assert kept(three.select(layer)) == [[1, 2, 3, 10, 11]]
    assert kept(six.select(layer)) == [[1, 2, 3, 6, 7, 8, 10, 11]]


def test_snapkv_gqa_averages_the_votes_of_each_kv_heads_query_group():
    # Query heads 0 and 1 share KV head 0 and look at positions 2 and 7; heads 2 and 3 share KV head 1
    # and both look at position 4, head 3 also at 8 but weakly.
    layer = layer_with_spikes(
        [[(2, 1.0)], [(7, 1.0)], [(4, 1.0)], [(4, 1.0), (8, 0.9)]],
        kv_heads=2,
    )
    method = build_method("snapkv", capacity=4, window_size=2, kernel_size=1)
    assert kept(method.select(layer)) == [[2, 7, 10, 11], [4, 8, 10, 11]]
    # Keys and values stay un-repeated: one row of indices per KV head.
    assert method.select(layer).indices.shape == (1, 2, 4)


def test_prompts_shorter_than_the_capacity_are_left_alone():
    layer = layer_with_spikes([[(2, 1.0)]], kv_heads=1, length=12)
    assert build_method("snapkv", capacity=13, window_size=2, kernel_size=1).select(layer) is None
    assert build_method("pyramidkv", capacity=13, window_size=2, kernel_size=1).select(layer) is None
    # At exactly the capacity the reference compresses, keeping everything.
    assert kept(build_method("snapkv", capacity=12, window_size=2, kernel_size=1).select(layer)) == [list(range(12))]


def test_pyramid_budgets_decrease_linearly_from_the_bottom_layer():
    budgets = [pyramid_prefix_budget(128, 8, 20, layer, 32, prompt_length=1000) for layer in range(32)]
    # average prefix 120: top 120 // 20 = 6, bottom 240 - 6 = 234, step (234 - 6) // 31 = 7
    assert budgets == [234 - 7 * layer for layer in range(32)]


def test_pyramid_budget_is_clipped_to_the_prompt_and_uniform_for_short_prompts():
    # 240 <= prompt < bottom + window: the bottom layer keeps the whole prefix, the top gets the rest.
    assert pyramid_prefix_budget(128, 8, 20, 0, 32, prompt_length=240) == 232
    assert pyramid_prefix_budget(128, 8, 20, 31, 32, prompt_length=240) == 232 - 31 * ((232 - 8) // 31)
    # prompt < 2 * average prefix: SnapKV's uniform budget.
    assert all(pyramid_prefix_budget(128, 8, 20, layer, 32, prompt_length=239) == 120 for layer in range(32))


def test_pyramidkv_selects_per_layer_budget_plus_window():
    spikes = [[(p, 1.0 - p / 100) for p in range(0, 40, 3)]]
    counts = []
    for layer_idx in range(4):
        layer = layer_with_spikes(spikes, kv_heads=1, length=48, layer_idx=layer_idx, num_layers=4)
        selection = build_method("pyramidkv", capacity=12, window_size=4, kernel_size=1, beta=4).select(layer)
        counts.append(selection.indices.shape[-1])
        assert selection.indices[0, 0, -4:].tolist() == [44, 45, 46, 47]
    # average 8: top 2, bottom 14, step 4 -> 14, 10, 6, 2 prefix tokens, plus the window of 4
    assert counts == [18, 14, 10, 6]


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("snapkv", {"capacity": 0}, "--capacity > 0"),
        ("snapkv", {"capacity": 8}, "larger than the observation window"),
        ("pyramidkv", {"capacity": 64, "kernel_size": 4}, "odd"),
        ("snapkv", {"capacity": 64, "window_size": 0}, "--window-size"),
        ("nosuch", {"capacity": 64}, "known methods"),
    ],
)
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(KvbenchError, match=message):
        build_method(name, **options)
