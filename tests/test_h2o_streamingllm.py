"""H2O and StreamingLLM on hand-built tensors: which positions each KV head keeps."""

import math

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.methods import REGISTRY, build_method
from kvbench.methods import h2o as h2o_module
from kvbench.methods.base import LayerPrefill
from kvbench.methods.scoring import keep_top_prefix_and_window

HIGH = 20.0  # a logit this far above the others takes nearly all of a row's softmax


def layer_from_logits(logits, kv_heads, dtype=torch.float32):
    """A layer whose query head h gives key j the logit ``logits[h][i][j]`` from query i (before the causal mask).

    Keys are one-hot (key j = e_j, head_dim = prompt length) in every KV head, so query row i of head h is
    ``logits[h, i] * sqrt(head_dim)``: H2O's logits are ``(q @ k^T) / sqrt(head_dim)``.
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    query_heads, length, _ = logits.shape
    queries = (logits * math.sqrt(length)).unsqueeze(0).to(dtype)
    keys = torch.eye(length, dtype=dtype).expand(1, kv_heads, length, length).contiguous()
    values = torch.randn(1, kv_heads, length, length).to(dtype)
    return LayerPrefill(0, 1, queries, keys, values, length**-0.5)


def every_query_prefers(length, preferences, query_heads=1, self_logit=0.0):
    """Logits where every query of head h gives ``preferences[h][position]`` to that position, ``self_logit``
    to its own position and 0 elsewhere. A self logit makes a query that sees none of its preferred positions
    attend to itself (each key then gets about 1 from its own row) instead of spreading over all it sees."""
    logits = torch.eye(length).expand(query_heads, length, length) * self_logit
    for head, wanted in enumerate(preferences):
        for position, logit in wanted.items():
            logits[head, :, position] = logit
    return logits


def kept(selection):
    return [row.tolist() for row in selection.indices[0]]


def dense_scores(layer, causal=True):
    """The reference's score in float64 (kv_head mode, mean over the group): the full attention matrix."""
    queries, keys = layer.queries[0].double(), layer.keys[0].double()
    query_heads, length, head_dim = queries.shape
    groups = query_heads // keys.shape[0]
    logits = queries @ keys.repeat_interleave(groups, dim=0).transpose(1, 2) / math.sqrt(head_dim)
    if causal:
        logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    mass = logits.softmax(dim=-1).sum(dim=-2)
    return mass.view(keys.shape[0], groups, length).mean(dim=1)


# ---------------------------------------------------------------------------------------------------- H2O


def test_h2o_keeps_the_most_attended_prefix_tokens_and_the_window():
    # Every query prefers 1, 4 and 6 (whichever it can see). Causal sums: key 1 ~ 6 (rows 1-3 alone,
    # then shared), key 4 ~ 3, key 6 ~ 2, key 0 ~ 1 (row 0 sees only itself), the rest ~ 0.
    layer = layer_from_logits(every_query_prefers(12, [{1: HIGH, 4: HIGH, 6: HIGH}]), kv_heads=1)
    method = build_method("h2o", capacity=5, window_size=2)
    assert kept(method.select(layer)) == [[1, 4, 6, 10, 11]]
    # One heavy hitter fewer: the least attended of the three goes.
    assert kept(build_method("h2o", capacity=4, window_size=2).select(layer)) == [[1, 4, 10, 11]]


def test_h2o_does_not_score_the_window():
    # The window's own tokens are the most attended, yet the heavy hitters come from the prefix only.
    layer = layer_from_logits(every_query_prefers(12, [{3: HIGH, 10: 2 * HIGH, 11: 2 * HIGH}]), kv_heads=1)
    assert kept(build_method("h2o", capacity=4, window_size=2).select(layer)) == [[0, 3, 10, 11]]


def test_h2o_is_causal_a_key_is_scored_only_by_the_queries_at_or_after_it():
    # Every query prefers key 9 strongly and key 1 less. Only queries 9-11 can see key 9, so causally key 1
    # (chosen by queries 1-8) wins; summed without the causal mask (like the reference's 2024-26 bug,
    # which left rows outside the window unmasked) key 9 would take every row's mass.
    layer = layer_from_logits(every_query_prefers(12, [{1: HIGH / 2, 9: HIGH}], self_logit=HIGH / 4), kv_heads=1)
    method = build_method("h2o", capacity=3, window_size=2)
    assert kept(method.select(layer)) == [[1, 10, 11]]
    assert dense_scores(layer, causal=True)[0, :10].argmax() == 1
    assert dense_scores(layer, causal=False)[0, :10].argmax() == 9


def test_h2o_gqa_averages_each_kv_heads_query_group():
    # Query heads 0 and 1 read KV head 0 and prefer 2 and 7; heads 2 and 3 read KV head 1 and prefer 5 and 8.
    # Each KV head keeps what its own group attends to (group means: 2 ~ 5.5, 7 ~ 2.5; 5 ~ 4, 8 ~ 2; the
    # other prefix keys at most 1, from the queries that attend to themselves).
    logits = every_query_prefers(12, [{2: HIGH}, {7: HIGH}, {5: HIGH}, {8: HIGH}], query_heads=4, self_logit=HIGH / 4)
    layer = layer_from_logits(logits, kv_heads=2)
    selection = build_method("h2o", capacity=4, window_size=2).select(layer)
    assert kept(selection) == [[2, 7, 10, 11], [5, 8, 10, 11]]
    # Keys and values stay un-repeated: one row of indices per KV head.
    assert selection.indices.shape == (1, 2, 4)
    assert selection.keys is None and selection.values is None


def test_h2o_gqa_mean_is_not_one_head_alone():
    # KV head 0's group: head 0 prefers 3 mildly everywhere, head 1 prefers 6 sharply. Head 0 alone would
    # rank 3 first (it also gets head 0's early rows); the group mean ranks 6 first.
    logits = every_query_prefers(12, [{3: 2.0, 6: 1.0}, {6: HIGH}], query_heads=2)
    layer = layer_from_logits(logits, kv_heads=1)
    one_head = layer_from_logits(logits[:1], kv_heads=1)
    assert kept(build_method("h2o", capacity=3, window_size=2).select(one_head)) == [[3, 10, 11]]
    assert kept(build_method("h2o", capacity=3, window_size=2).select(layer)) == [[6, 10, 11]]


@pytest.mark.parametrize("query_heads,kv_heads", [(2, 2), (4, 2), (6, 1)])
def test_h2o_matches_the_dense_reference_score_on_random_tensors(query_heads, kv_heads):
    generator = torch.Generator().manual_seed(query_heads * 10 + kv_heads)
    length, head_dim, window, capacity = 40, 8, 8, 20
    queries = torch.randn(1, query_heads, length, head_dim, generator=generator) * 2
    keys = torch.randn(1, kv_heads, length, head_dim, generator=generator)
    values = torch.randn(1, kv_heads, length, head_dim, generator=generator)
    # scaling 1.0, not the model's: the reference divides by sqrt(head_dim) whatever the attention's scaling is
    layer = LayerPrefill(0, 1, queries, keys, values, 1.0)
    scores = dense_scores(layer)[:, : length - window]
    expected = scores.topk(capacity - window, dim=-1).indices.sort(dim=-1).values
    window_positions = torch.arange(length - window, length).expand(kv_heads, -1)
    selection = build_method("h2o", capacity=capacity, window_size=window).select(layer)
    assert torch.equal(selection.indices[0], torch.cat([expected, window_positions], dim=-1))


def test_h2o_keeps_positions_ascending_and_breaks_ties_for_the_earlier_token(monkeypatch):
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 3.0]])  # (KV heads, prefix)
    monkeypatch.setattr(h2o_module, "heavy_hitter_scores", lambda layer, window: scores)
    layer = layer_from_logits(every_query_prefers(8, [{}]), kv_heads=1)
    # top 3: position 5 (3.0), then two of the three equal 2.0s: the earlier ones, 1 and 2
    assert kept(build_method("h2o", capacity=5, window_size=2).select(layer)) == [[1, 2, 5, 6, 7]]


def test_snapkv_selection_keeps_the_topk_positions_ascending_then_the_window():
    scores = torch.tensor([[[1.0, 4.0, 0.5, 3.0, 2.0]]])
    assert kept(keep_top_prefix_and_window(scores, 2, prompt_length=7)) == [[1, 3, 5, 6]]


def test_h2o_runs_in_bf16():
    layer = layer_from_logits(every_query_prefers(12, [{1: HIGH, 4: HIGH, 6: HIGH}]), kv_heads=1, dtype=torch.bfloat16)
    assert kept(build_method("h2o", capacity=5, window_size=2).select(layer)) == [[1, 4, 6, 10, 11]]


def test_h2o_leaves_short_prompts_alone_and_keeps_all_at_exactly_the_capacity():
    layer = layer_from_logits(every_query_prefers(12, [{1: HIGH}, {1: HIGH}], query_heads=2), kv_heads=2)
    assert build_method("h2o", capacity=13, window_size=2).select(layer) is None
    # At exactly the capacity the reference compresses, keeping everything (here in position order).
    assert kept(build_method("h2o", capacity=12, window_size=2).select(layer)) == [list(range(12))] * 2


# ---------------------------------------------------------------------------------------------- StreamingLLM


def random_layer(length, kv_heads=2, query_heads=4, head_dim=4):
    queries = torch.randn(1, query_heads, length, head_dim)
    keys = torch.randn(1, kv_heads, length, head_dim)
    return LayerPrefill(0, 1, queries, keys, torch.randn_like(keys), head_dim**-0.5)


def test_streamingllm_keeps_the_four_sinks_and_the_most_recent_tokens():
    selection = build_method("streamingllm", capacity=10).select(random_layer(20))
    assert kept(selection) == [[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]] * 2
    assert selection.indices.shape == (1, 2, 10)
    assert selection.keys is None and selection.values is None


def test_streamingllm_sink_size_option():
    assert kept(build_method("streamingllm", capacity=6, sink_size=1).select(random_layer(20, kv_heads=1))) == [
        [0, 15, 16, 17, 18, 19]
    ]
    # The reference's pre-2024-07 LongBench setting (window 32): the first C - 32 tokens and the last 32.
    capacity = 40
    selection = build_method("streamingllm", capacity=capacity, sink_size=capacity - 32).select(random_layer(100))
    assert kept(selection)[0] == list(range(8)) + list(range(68, 100))


def test_streamingllm_leaves_short_prompts_alone_and_keeps_all_at_exactly_the_capacity():
    assert build_method("streamingllm", capacity=21).select(random_layer(20)) is None
    assert kept(build_method("streamingllm", capacity=20).select(random_layer(20))) == [list(range(20))] * 2


# ----------------------------------------------------------------------------------------------- both


def test_defaults_are_the_longbench_settings():
    assert build_method("h2o", capacity=128).window_size == 8
    assert build_method("streamingllm", capacity=128).sink_size == 4
    for name in ("h2o", "streamingllm"):
        assert REGISTRY[name].description


@pytest.mark.parametrize(
    "name,options,flag",
    [
        ("h2o", {}, "--capacity"),
        ("h2o", {"capacity": 0}, "--capacity"),
        ("h2o", {"capacity": -5}, "--capacity"),
        ("h2o", {"capacity": 16, "window_size": 0}, "--window-size"),
        ("h2o", {"capacity": 16, "window_size": -1}, "--window-size"),
        ("h2o", {"capacity": 8, "window_size": 8}, "--window-size"),
        ("h2o", {"capacity": 8, "window_size": 9}, "--window-size"),
        ("streamingllm", {}, "--capacity"),
        ("streamingllm", {"capacity": 0}, "--capacity"),
        ("streamingllm", {"capacity": 16, "sink_size": 0}, "--sink-size"),
        ("streamingllm", {"capacity": 16, "sink_size": -4}, "--sink-size"),
        ("streamingllm", {"capacity": 4, "sink_size": 4}, "--sink-size"),
        ("streamingllm", {"capacity": 4, "sink_size": 5}, "--sink-size"),
    ],
)
def test_bad_options_are_one_line_errors(name, options, flag):
    with pytest.raises(KvbenchError) as error:
        build_method(name, **options)
    message = str(error.value)
    assert "\n" not in message and flag in message


def test_undeclared_options_are_refused():
    with pytest.raises(KvbenchError, match="--kernel-size is not an option of h2o"):
        build_method("h2o", capacity=16, kernel_size=7)
    with pytest.raises(KvbenchError, match="--window-size is not an option of streamingllm"):
        build_method("streamingllm", capacity=16, window_size=8)
