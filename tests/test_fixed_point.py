"""What PrefixKV and Elastic Cache share: the importance score, budgets, option checks, fixed-point eviction."""

import math
from fractions import Fraction

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.methods import build_method
from tests.method_helpers import sample_state
from kvbench.methods.importance import chunked_attention_mass, protected_positions, rank_middle

BOTH = ["prefixkv", "elastic"]


def method(name, **options):
    if name == "prefixkv":
        options.setdefault("prefix_config", "online")
    return build_method(name, **options)


# -- importance ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 40, 10**9])
def test_importance_is_the_causal_column_sum_averaged_over_query_heads(chunk_bytes):
    # Two query heads share one KV head (GQA), head_dim 1, scaling 1.
    # Head 0 has a zero query: uniform over the causal prefix -> rows [1], [1/2 1/2], [1/3 1/3 1/3],
    #   column sums 11/6, 5/6, 1/3.
    # Head 1 has query 1 against keys [0, ln 2, 0] -> rows [1], [1/3 2/3], [1/4 1/2 1/4],
    #   column sums 19/12, 7/6, 1/4.
    # (Exhaustive comparisons with the dense attention matrix, and of the Triton kernel: test_attention_mass.py.)
    queries = torch.tensor([0.0, 0, 0, 1, 1, 1]).view(1, 2, 3, 1)
    keys = torch.tensor([0.0, math.log(2), 0]).view(1, 1, 3, 1)
    expected = torch.tensor([(11 / 6 + 19 / 12) / 2, (5 / 6 + 7 / 6) / 2, (1 / 3 + 1 / 4) / 2])
    torch.testing.assert_close(chunked_attention_mass(queries, keys, 1.0, chunk_bytes=chunk_bytes), expected)
    # One KV head: its group is every query head, so the per-KV-head score is the same row.
    per_kv_head = chunked_attention_mass(queries, keys, 1.0, per_kv_head=True, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(per_kv_head, expected.view(1, 3))


def test_middle_ranking_and_protected_positions():
    scores = torch.tensor([0.0, 0, 5, 1, 5, 3, 0])
    assert rank_middle(scores, 2, 1).tolist() == [2, 4, 5, 3]  # equal scores: earlier first
    assert protected_positions(7, 2, 1).tolist() == [0, 1, 6]
    assert protected_positions(3, 4, 1).tolist() == [0, 1, 2]


# -- options and budgets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 1.0}, "--ratio must be in [0, 1)"),
        ({"ratio": -0.1}, "--ratio must be in [0, 1)"),
        ({"ratio": 0.5, "capacity": 64}, "exactly one of --ratio"),
        ({}, "exactly one of --ratio"),
        ({"capacity": 0}, "--capacity must be > 0"),
        ({"ratio": 0.5, "distance": 0}, "--distance must not be 0"),
        ({"ratio": 0.5, "start_size": -1}, "--start-size"),
    ],
)
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(KvbenchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as error:
        method(name, **options)
    assert "\n" not in str(error.value)


def test_budgets_from_ratio_and_capacity():
    by_ratio = method("elastic", ratio=0.25)
    by_capacity = method("elastic", capacity=75)
    assert by_ratio.layer_drop(100) == by_capacity.layer_drop(100) == 25
    assert by_ratio.total_drop(100, 3) == by_capacity.total_drop(100, 3) == 75
    assert method("elastic", ratio=0.3).total_drop(10, 3) == 9  # round(0.3 * 10 * 3)
    # capacity >= prompt length: no compression; protected tokens cap the drop
    assert method("elastic", capacity=100).layer_drop(100) == 0
    assert method("elastic", capacity=2).layer_drop(100) == 95
    assert method("elastic", ratio=0.99).layer_drop(10) == 5
    assert method("elastic", ratio=0.0).layer_drop(10) == 0


# -- fixed-point elimination (the rule on the method object) ---------------------------------------------


def decode(method_object, prompt_positions, prompt_length, steps, layer=0):
    """Simulate the engine: before each step ask for an eviction, drop it, append the new token.

    Cache entries are labelled by their original position; returns (sizes before each append, evicted labels).
    """
    cache = list(prompt_positions)
    sizes, evicted = [], []
    for step in range(steps):
        tokens_seen = prompt_length + step
        index = method_object.decode_eviction(layer, len(cache), tokens_seen)
        if index is not None:
            evicted.append(cache.pop(index))
        cache.append(tokens_seen)
        sizes.append(len(cache))
    return sizes, evicted, cache


@pytest.mark.parametrize("name", BOTH)
def test_capacity_holds_the_cache_at_its_size_and_evicts_at_the_fixed_point(name):
    m = sample_state(method(name, capacity=60), 120)
    if name == "prefixkv":
        m.drops = [60]
        m._set_kept()
    kept = list(range(60))  # labels of the 60 kept prompt entries (which ones does not matter here)
    sizes, evicted, cache = decode(m, kept, 120, 50)
    assert sizes == [60] * 50
    # index 60 - 25 = 35: first the kept prompt's last 25 entries, then the oldest decoded tokens
    assert evicted == kept[35:] + list(range(120, 145))
    assert cache == kept[:35] + list(range(145, 170))


def test_positive_distance_is_an_absolute_index_and_bad_indices_fall_back_to_the_middle():
    m = sample_state(method("elastic", capacity=60, distance=7), 120)
    assert m.decode_eviction(0, 60, 120) == 7
    far = sample_state(method("elastic", capacity=60, distance=500), 120)
    assert far.decode_eviction(0, 60, 120) == 30
    short = sample_state(method("elastic", capacity=10, distance=-25), 120)  # 10 - 25 < 1: the reference's kept // 2
    assert short.decode_eviction(0, 10, 120) == 5


@pytest.mark.parametrize("prompt_length, ratio", [(128, 0.25), (100, 0.3), (77, 0.6)])
def test_ratio_mode_follows_the_reference_rule_exactly(prompt_length, ratio):
    """The reference, after appending: evict iff int(len - seen * (1 - R_l)) > 0; here in exact fractions."""
    m = sample_state(method("elastic", ratio=ratio), prompt_length)
    kept = m.kept[0]
    keep_fraction = Fraction(kept, prompt_length)
    cache_length = kept
    for step in range(300):
        tokens_seen = prompt_length + step
        ours = m.decode_eviction(0, cache_length, tokens_seen) is not None
        reference = math.floor((cache_length + 1) - (tokens_seen + 1) * keep_fraction) > 0
        assert ours == reference, step
        cache_length += 1 - ours
    # the cache grew by (1 - R) per decoded token
    assert abs(cache_length - (prompt_length + 300) * keep_fraction) < 1


@pytest.mark.parametrize("name", BOTH)
def test_no_decode_evict_and_uncompressed_samples_just_append(name):
    m = sample_state(method(name, capacity=60, decode_evict=False), 120)
    assert m.decode_eviction(0, 60, 120) is None
    m = sample_state(method(name, capacity=200), 120)  # capacity >= prompt: no compression at all
    assert m.decode_eviction(0, 120, 120) is None
