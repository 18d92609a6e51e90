"""Elastic Cache: anchors, merging into the nearest anchor, and runs on tiny random models."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kvbench.engine.generate import generate_greedy
from kvbench.methods import build_method
from kvbench.methods import importance as importance_module
from kvbench.methods.base import LayerPrefill
from kvbench.methods.elastic import anchor_segments, merge_into_anchors
from tests.method_helpers import recording, sample_state
from tests.tiny_models import random_prompt, tiny_model

LENGTH = 10
START, PROTECT = 2, 1  # protected: 0, 1 and 9; middle 2..8
# Middle scores by position: anchors (top 3) are 6 (9.0), 8 (8.0) and 2 (5.0).
SCORES = torch.tensor([0.0, 0.0, 5, 1, 2, 0.5, 9, 3, 8, 0.0])


@pytest.fixture
def fake_scores(monkeypatch):
    monkeypatch.setattr(importance_module, "attention_importance", lambda layer: SCORES)


def hand_layer(kv_heads=2, query_heads=4):
    positions = torch.arange(LENGTH, dtype=torch.float32)
    # key of head h at position p: [p^2 + 100 h, -p]; values random. Squares, so a mean is not the middle token.
    keys = torch.stack([torch.stack([positions**2 + 100 * h, -positions], dim=-1) for h in range(kv_heads)]).unsqueeze(0)
    values = torch.randn(1, kv_heads, LENGTH, 2, generator=torch.Generator().manual_seed(0))
    queries = torch.zeros(1, query_heads, LENGTH, 2)
    return LayerPrefill(0, 1, queries, keys, values, 1.0)


def elastic(**options):
    return build_method("elastic", start_size=START, protect_size=PROTECT, **options)


def test_each_middle_token_goes_to_its_nearest_anchor_ties_to_the_earlier():
    # middle 0..12, anchors 2, 6, 8: 0-4 -> 2 (4 is 2 from both 2 and 6), 5-7 -> 6 (7 ties 6 and 8), 8-12 -> 8
    assert anchor_segments(torch.tensor([2, 6, 8]), 0, 13).tolist() == [5, 3, 5]


@pytest.mark.parametrize("seed", range(5))
def test_anchor_segments_are_the_nearest_anchor_of_every_token_on_random_anchors(seed):
    generator = torch.Generator().manual_seed(seed)
    lo, hi = 3, 60
    anchors = (torch.randperm(hi - lo, generator=generator)[: 1 + seed * 4] + lo).sort().values
    nearest = [min(anchors.tolist(), key=lambda anchor: (abs(anchor - position), anchor)) for position in range(lo, hi)]
    expected = [nearest.count(anchor) for anchor in anchors.tolist()]
    assert anchor_segments(anchors, lo, hi).tolist() == expected


def test_dropped_tokens_are_averaged_into_their_nearest_anchor(fake_scores):
    method = sample_state(elastic(capacity=6), LENGTH)  # drop 4 of the 7 middle tokens
    layer = hand_layer()
    selection = method.select(layer)
    assert selection.indices[0].tolist() == [[0, 1, 2, 6, 8, 9]] * 2
    # dropped 3, 4, 5, 7: 3 -> 2; 4 is 2 from both 2 and 6 -> 2 (earlier); 5 -> 6; 7 is 1 from 6 and 8 -> 6
    groups = {2: [2, 3, 4], 6: [6, 5, 7], 8: [8]}
    for head in range(2):
        expected_keys = []
        expected_values = []
        for position in [0, 1, 2, 6, 8, 9]:
            members = groups.get(position, [position])
            expected_keys.append(layer.keys[0, head, members].mean(dim=0))
            expected_values.append(layer.values[0, head, members].mean(dim=0))
        torch.testing.assert_close(selection.keys[0, head], torch.stack(expected_keys))
        torch.testing.assert_close(selection.values[0, head], torch.stack(expected_values))
    # by hand, head 0 keys: anchor 2 = mean(4, 9, 16) = 29/3; anchor 6 = mean(36, 25, 49) = 110/3; anchor 8 = 64
    assert selection.keys[0, 0, 2:5, 0].tolist() == pytest.approx([29 / 3, 110 / 3, 64])
    assert selection.keys[0, 1, 2:5, 0].tolist() == pytest.approx([29 / 3 + 100, 110 / 3 + 100, 164])


def test_no_merge_is_plain_top_k_eviction(fake_scores):
    method = sample_state(elastic(capacity=6, merge=False), LENGTH)
    selection = method.select(hand_layer())
    assert selection.indices[0, 0].tolist() == [0, 1, 2, 6, 8, 9]
    assert selection.keys is None and selection.values is None


def reference_kept_middle(middle_scores, drop):
    """The reference's anchor rule, restated: slots of argsort whose token index exceeds the drop count."""
    return torch.where(torch.argsort(middle_scores) > drop)[0].tolist()


def test_anchors_are_the_top_ranked_tokens_not_the_reference_index_comparison(monkeypatch):
    # Middle scores chosen so that comparing argsort's token indices with the drop count keeps other
    # tokens than the top ones: a test of "anchors = highest scores" fails on the reference's rule.
    middle = torch.tensor([5.0, 1, 8, 3, 7, 2, 6, 4])  # positions 2..9
    scores = torch.cat([torch.zeros(2), middle, torch.zeros(1)])
    monkeypatch.setattr(importance_module, "attention_importance", lambda layer: scores)
    method = sample_state(elastic(capacity=8), 11)  # 11 tokens, drop 3: keep the 5 best middle tokens
    positions = torch.zeros(1, 1, 11, 2)
    layer = LayerPrefill(0, 1, positions, positions.clone(), positions.clone(), 1.0)
    kept_middle = [p - 2 for p in method.select(layer).indices[0, 0].tolist()[2:-1]]
    top = sorted(middle.argsort(descending=True)[:5].tolist())
    assert kept_middle == top == [0, 2, 4, 6, 7]
    wrong = reference_kept_middle(middle, 3)
    assert wrong != top  # the reference keeps [1, 3, 5, 6]: scores 1, 3, 2, 6
    assert len(wrong) == 4  # and drops one token too many


def test_dropping_every_middle_token_keeps_the_protected_ones_unmerged(fake_scores):
    method = sample_state(elastic(capacity=1), LENGTH)
    layer = hand_layer()
    selection = method.select(layer)
    assert selection.indices[0, 0].tolist() == [0, 1, 9]
    assert selection.keys is None


@pytest.mark.parametrize("seed", range(3))
def test_protected_tokens_always_kept_and_exact_drop_on_random_layers(seed):
    generator = torch.Generator().manual_seed(seed)
    length = 64
    queries = torch.randn(1, 4, length, 8, generator=generator) * 3
    keys = torch.randn(1, 2, length, 8, generator=generator) * 3
    values = torch.randn(1, 2, length, 8, generator=generator)
    method = sample_state(build_method("elastic", ratio=0.6), length)
    selection = method.select(LayerPrefill(0, 1, queries, keys, values, 8**-0.5))
    kept = selection.indices[0, 0].tolist()
    assert len(kept) == length - int(length - length * (1 - 0.6))
    assert kept[:4] == [0, 1, 2, 3] and kept[-1] == length - 1
    assert selection.indices.shape[:2] == (1, 2) and torch.equal(selection.indices[0, 0], selection.indices[0, 1])
    assert selection.keys.shape == (1, 2, len(kept), 8)


def test_ratio_and_capacity_agree_on_the_same_sample(fake_scores):
    selections = []
    for budget in ({"capacity": 6}, {"ratio": 0.4}):  # 10 tokens: both drop 4
        method = sample_state(elastic(**budget), LENGTH)
        selections.append(method.select(hand_layer()))
    assert torch.equal(selections[0].indices, selections[1].indices)
    assert torch.equal(selections[0].keys, selections[1].keys)


def test_tiny_gqa_model_holds_the_cache_for_50_steps():
    model = tiny_model("llama", num_layers=3)
    prompt = random_prompt(120)
    compressor = recording(build_method("elastic", capacity=60), 3)
    generation = generate_greedy(model, prompt, compressor, 51, set())
    assert generation.kept_per_layer == [60] * 3
    assert [(length, index) for _, length, _, index in compressor.evictions] == [(60, 35)] * (50 * 3)
    assert compressor.last_sample.record()["budget_per_layer"] == [60] * 3


def test_ratio_truncates_the_drop_as_the_reference_does():
    # The reference's forget_num = int(L - L * (1 - R)): 15 tokens at R = 0.3 drop int(4.5) = 4, where
    # rounding R * L half up would drop 5.
    assert sample_state(build_method("elastic", ratio=0.3), 15).drop == 4
    assert sample_state(build_method("elastic", ratio=0.5), 101).drop == int(101 - 101 * 0.5) == 50


def test_merge_changes_the_output_of_a_tiny_model():
    model = tiny_model("llama", num_layers=3)
    prompt = random_prompt(200)
    merged = generate_greedy(model, prompt, build_method("elastic", ratio=0.9), 10, set())
    evicted = generate_greedy(model, prompt, build_method("elastic", ratio=0.9, merge=False), 10, set())
    assert merged.kept_per_layer == evicted.kept_per_layer == [20] * 3
    assert merged.token_ids != evicted.token_ids


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_the_fused_merge_under_the_interpreter_gives_the_segment_means():
    script = os.path.join(os.path.dirname(__file__), "interpret_segment_means.py")
    result = subprocess.run([sys.executable, script], env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=300, check=False, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcome["excess"]) == 4 and max(outcome["excess"].values()) <= 1, outcome
    assert all(outcome["exact"].values()), outcome


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU adds in order anyway)")
def test_cuda_merging_is_deterministic_and_equals_the_cpu_float32_means():
    # Thousands of tokens onto few anchors: adding by CUDA atomics would add them in a varying order.
    generator = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(1, 8, 8192, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(1, 8, 8192, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
    anchors = (torch.randperm(8190, generator=generator, device="cuda")[:64] + 1).sort().values
    first = merge_into_anchors(keys, values, anchors, 1, 8191)
    for _ in range(5):
        again = merge_into_anchors(keys, values, anchors, 1, 8191)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    on_cpu = merge_into_anchors(keys.cpu(), values.cpu(), anchors.cpu(), 1, 8191)
    # float32 sums of up to a few hundred bf16 values: orders may differ by device, so the means may round to
    # the neighbouring bf16 value (2^-8 relative), never further
    for cuda_result, cpu_result in zip(first, on_cpu):
        torch.testing.assert_close(cuda_result.cpu().float(), cpu_result.float(), rtol=2**-7, atol=2**-7)


def test_segment_bounds_are_the_ends_around_the_middle():
    """[lo - 1, hi - 1] for every middle, one token wide to long (made on the device, without a host copy)."""
    from kvbench.methods.elastic import segment_bounds

    for lo, hi in [(0, 1), (4, 5), (4, 100), (1, 2)]:
        bounds = segment_bounds(torch.device("cpu"), lo, hi)
        assert bounds.tolist() == [lo - 1, hi - 1] and bounds.dtype == torch.long
