"""WindowKV: budgets, window scoring by hand, layer sharing, edge cases, and the hook on a tiny Llama."""

import math

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.methods import build_method, get_method_class
from kvbench.methods.base import LayerPrefill, ModelInfo
from kvbench.methods.windowkv import WindowKV, group_budgets, kept_windows, window_ranking, window_scores
from tests.method_helpers import RecordingCompressor, recording, sample_state

EPS = 1e-6


def method(capacity=8, **options):
    options.setdefault("task_type", "other")
    return WindowKV(capacity=capacity, **options)


def layer_from_weights(weights, suffix, layer_idx=0, num_layers=1, heads=1, kv_heads=None, head_dim=4):
    """Queries/keys whose suffix attention over the reviewable tokens is proportional to ``weights``.

    Every suffix query is e1 and reviewable key j is e1 * sqrt(d) * log(w_j), so its logit is
    log(w_j); the suffix keys are zero (logit 0). Each suffix query's softmax over the reviewable
    columns is then w_j / Z_i, and the summed votes are proportional to the weights.
    ``weights``: a list (same for every head) or a list per head.
    """
    kv_heads = kv_heads or heads
    per_head = weights if isinstance(weights[0], (list, tuple)) else [weights] * kv_heads
    reviewable = len(per_head[0])
    length = reviewable + suffix
    queries = torch.zeros(1, heads, length, head_dim)
    queries[..., 0] = 1.0
    keys = torch.zeros(1, kv_heads, length, head_dim)
    for head, head_weights in enumerate(per_head):
        keys[0, head, :reviewable, 0] = torch.tensor(head_weights).log() * math.sqrt(head_dim)
    return LayerPrefill(layer_idx, num_layers, queries, keys, keys.clone(), 1 / math.sqrt(head_dim))


def random_layer(layer_idx, num_layers, length, heads=4, kv_heads=2, head_dim=8):
    keys = torch.randn(1, kv_heads, length, head_dim)
    return LayerPrefill(layer_idx, num_layers, torch.randn(1, heads, length, head_dim) * 2, keys, keys.clone(), 1.0)


def kept(selection):
    """The kept positions, checking every KV head keeps the same ones."""
    indices = selection.indices
    assert indices.shape[0] == 1
    for head in range(indices.shape[1]):
        assert torch.equal(indices[0, head], indices[0, 0])
    return indices[0, 0].tolist()


# -- budgets -----------------------------------------------------------------------------------


def test_llama3_group_budgets():
    assert group_budgets(512, 8, 14, 32) == [732, 586, 440, 292]


def test_layers_not_divisible_by_shared_layers_get_a_shorter_last_group():
    # SmolLM2 (30 layers) and Qwen2.5-7B (28): 4 groups, the reference's formula, last group shorter.
    assert group_budgets(512, 8, 14, 30) == [732, 586, 440, 292]
    assert group_budgets(512, 8, 14, 28) == [732, 586, 440, 292]
    assert group_budgets(512, 8, 14, 25) == [732, 586, 440, 292]
    assert group_budgets(512, 8, 14, 24) == [732, 512, 292]
    wkv = method(capacity=512, task_type="qa")
    state = sample_state(wkv, 2000, 30, sample={})
    assert state.record() == {"task_type": "qa", "group_budgets": [732, 586, 440, 292]}
    # Layers 24..29 form the last group: layer 24 leads, 25..29 reuse its choice, budget 292.
    torch.manual_seed(0)
    length = 400 + 32
    leader = state.select(random_layer(24, 30, length))
    assert len(kept(leader)) == 288 + 32  # 400 reviewable - ceil(108 / 8) = 14 windows of 8
    for layer_idx in range(25, 30):
        assert torch.equal(state.select(random_layer(layer_idx, 30, length)).indices, leader.indices)


@pytest.mark.parametrize("num_layers", [1, 6, 8])
def test_one_group_when_shared_layers_cover_the_model(num_layers):
    # The reference divides by zero (layers == S) or indexes an empty list (layers < S).
    assert group_budgets(40, 8, 14, num_layers) == [40]
    wkv = method(capacity=16, review_window_size=4, suffix_avg=4)
    state = sample_state(wkv, 36, num_layers, sample={})
    torch.manual_seed(0)
    selections = []
    for layer_idx in range(num_layers):
        selections.append(kept(state.select(random_layer(layer_idx, num_layers, 36))))
    assert len(selections[0]) == 16 + 4
    assert all(selection == selections[0] for selection in selections)


# -- window scores by hand -----------------------------------------------------------------------


def test_window_scores_average_and_max_by_hand():
    votes = torch.tensor([[[0.7, 0.7, 0.7, 0.7, 2.4, 0.0, 0.0, 0.0, 0.8, 0.8, 0.8, 0.8, 0.3, 0.1]]])
    average = window_scores(votes, 4, "average")
    top_half = window_scores(votes, 4, "max")
    torch.testing.assert_close(average, torch.tensor([0.7, 0.6, 0.8, 0.2]))
    # Top min(4 // 2, window length) = 2 tokens; the last window has 2 tokens.
    torch.testing.assert_close(top_half, torch.tensor([0.7, 1.2, 0.8, 0.2]))


def test_max_scores_are_per_head_top_tokens_then_mean_over_heads():
    # Head 0 peaks on two tokens of window 0, head 1 sees nothing there: (1 + 0) / 2 = 0.5.
    # Pooling the heads' tokens first would give window 0 a score of 1.
    votes = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.6, 0.6, 0.6, 0.6], [0.0, 0.0, 0.0, 0.0, 0.6, 0.6, 0.6, 0.6]]])
    torch.testing.assert_close(window_scores(votes, 4, "max"), torch.tensor([0.5, 0.6]))
    torch.testing.assert_close(window_scores(votes, 4, "average"), torch.tensor([0.25, 0.6]))


def test_review_window_of_one_token_scores_that_token():
    # The reference's top 1 // 2 = 0 tokens would give NaN scores.
    votes = torch.tensor([[[0.1, 0.5, 0.3]]])
    torch.testing.assert_close(window_scores(votes, 1, "max"), torch.tensor([0.1, 0.5, 0.3]))


def test_a_partial_last_window_keeps_only_its_reviewable_positions():
    """18 reviewable tokens in windows of 4: the last window holds 2. Kept (with the best other window), it adds
    those 2 positions and none past the reviewable end; dropped, it adds none."""
    wkv = method(capacity=8, review_window_size=4, suffix_avg=4)
    for last, expected in ((9.0, [4, 5, 6, 7, 16, 17]), (0.1, [0, 1, 2, 3, 4, 5, 6, 7])):
        weights = [3.0] * 4 + [5.0] * 4 + [1.0] * 8 + [last] * 2
        state = sample_state(wkv, 22, 1, sample={})
        assert kept(state.select(layer_from_weights(weights, suffix=4))) == expected + [18, 19, 20, 21]


def test_ties_drop_the_later_window_first():
    assert kept_windows(window_ranking(torch.tensor([0.5, 0.5, 0.5, 0.5])), 1).tolist() == [0, 1, 2]
    assert kept_windows(window_ranking(torch.tensor([0.5, 0.2, 0.5, 0.2, 0.9])), 2).tolist() == [0, 2, 4]
    # Uniform attention (zero queries): every window ties, the last ones go.
    wkv = method(capacity=8, review_window_size=4, suffix_avg=4)
    state = sample_state(wkv, 20, 1, sample={})
    layer = layer_from_weights([1.0] * 16, suffix=4)
    layer.queries.zero_()
    assert kept(state.select(layer)) == [0, 1, 2, 3, 4, 5, 6, 7] + [16, 17, 18, 19]


# -- selection on hand-built queries/keys --------------------------------------------------------

# Four windows of 4: averages 0.7, 0.6, 0.8, 0.1; top-2 means 0.7, 1.2, 0.8, 0.1.
WEIGHTS = [0.7] * 4 + [2.4, EPS, EPS, EPS] + [0.8] * 4 + [0.1] * 4


def test_average_keeps_the_windows_with_the_highest_mean():
    # 16 reviewable tokens, budget 8 (one group): drop ceil(8 / 4) = 2 windows.
    wkv = method(capacity=8, review_window_size=4, suffix_avg=4, task_type="other")
    state = sample_state(wkv, 20, 1, sample={})
    assert kept(state.select(layer_from_weights(WEIGHTS, suffix=4))) == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]


def test_max_keeps_the_windows_with_the_highest_top_half():
    wkv = method(capacity=8, review_window_size=4, suffix_max=4, task_type="qa")
    state = sample_state(wkv, 20, 1, sample={})
    assert kept(state.select(layer_from_weights(WEIGHTS, suffix=4))) == [4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19]


def test_suffix_size_follows_the_strategy():
    weights = [1.0] * 16
    for task_type, suffix in (("qa", 6), ("other", 3)):
        wkv = method(capacity=8, review_window_size=4, suffix_max=6, suffix_avg=3, task_type=task_type)
        state = sample_state(wkv, 16 + suffix, 1, sample={})
        positions = kept(state.select(layer_from_weights(weights, suffix=suffix)))
        assert positions[-suffix:] == list(range(16, 16 + suffix))
        assert len(positions) == 8 + suffix


def test_budget_is_reviewed_tokens_and_short_last_window():
    # 14 reviewable tokens, windows 0-3, 4-7, 8-11, 12-13, budget 8: drop ceil(6 / 4) = 2 windows.
    weights = [0.5] * 4 + [0.1] * 4 + [0.9] * 4 + [0.05, 0.05]
    wkv = method(capacity=8, review_window_size=4, suffix_avg=4)
    state = sample_state(wkv, 18, 1, sample={})
    # The short window is among the dropped ones: 14 - 4 - 2 = 8 reviewable tokens kept.
    assert kept(state.select(layer_from_weights(weights, suffix=4))) == [0, 1, 2, 3, 8, 9, 10, 11, 14, 15, 16, 17]
    weights = [0.5] * 4 + [0.1] * 4 + [0.05] * 4 + [0.9, 0.9]
    # Dropping two full windows instead: only 6 reviewable tokens remain (the reference's arithmetic).
    assert kept(state.select(layer_from_weights(weights, suffix=4))) == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17]


def test_short_prompts_are_untouched():
    wkv = method(capacity=8, review_window_size=4, suffix_avg=4)
    state = sample_state(wkv, 12, 1, sample={})
    assert state.select(layer_from_weights([1.0] * 8, suffix=4)) is None  # 8 reviewable == budget
    assert state.select(layer_from_weights([1.0] * 1, suffix=2)) is None  # shorter than the suffix
    assert state.select(layer_from_weights([1.0] * 9, suffix=4)) is not None


def test_budget_smaller_than_a_window_keeps_the_suffix_only_in_the_whole_group():
    # capacity 3 with windows of 4 and 8 reviewable tokens: ceil(5 / 4) = 2 = every window.
    wkv = method(capacity=3, review_window_size=4, suffix_avg=4, shared_layers=2)
    state = sample_state(wkv, 12, 2, sample={})
    for layer_idx in range(2):
        layer = layer_from_weights([1.0] * 8, suffix=4, layer_idx=layer_idx, num_layers=2)
        assert kept(state.select(layer)) == [8, 9, 10, 11]


def test_shared_layers_reuse_the_group_leaders_positions():
    # 4 layers in groups of 2, capacity 6, beta 3: last 6*2//3 = 4, first 12 - 4 = 8.
    wkv = method(capacity=6, review_window_size=4, suffix_avg=4, shared_layers=2, beta=3)
    state = sample_state(wkv, 20, 4, sample={})
    favour_first = [0.9] * 4 + [0.8] * 4 + [0.1] * 4 + [0.05] * 4
    favour_last = list(reversed(favour_first))
    first_two_windows = list(range(8)) + list(range(16, 20))
    last_window = list(range(12, 20))
    assert kept(state.select(layer_from_weights(favour_first, suffix=4, layer_idx=0, num_layers=4))) == first_two_windows
    # Layer 1 would choose the last windows on its own; it keeps the leader's.
    assert kept(state.select(layer_from_weights(favour_last, suffix=4, layer_idx=1, num_layers=4))) == first_two_windows
    # Layer 2 leads the next group (budget 4): it scores its own input.
    assert kept(state.select(layer_from_weights(favour_last, suffix=4, layer_idx=2, num_layers=4))) == last_window
    assert kept(state.select(layer_from_weights(favour_first, suffix=4, layer_idx=3, num_layers=4))) == last_window
    # A new sample forgets the leaders' choices.
    state = sample_state(wkv, 20, 4, sample={})
    state.select(layer_from_weights(favour_last, suffix=4, layer_idx=0, num_layers=4))
    positions = kept(state.select(layer_from_weights(favour_first, suffix=4, layer_idx=1, num_layers=4)))
    assert positions == list(range(8, 20))


def test_gqa_keeps_the_same_positions_in_every_unrepeated_kv_head():
    torch.manual_seed(3)
    length, heads, kv_heads = 60, 8, 2
    queries = torch.randn(1, heads, length, 8) * 3
    keys = torch.randn(1, kv_heads, length, 8)
    for task_type in ("qa", "other"):
        wkv = method(capacity=16, review_window_size=4, suffix_max=8, suffix_avg=8, task_type=task_type)
        state = sample_state(wkv, length, 1, sample={})
        grouped = state.select(LayerPrefill(0, 1, queries, keys, keys, 1.0))
        assert grouped.indices.shape[:2] == (1, kv_heads)
        positions = kept(grouped)
        # Same as the reference's layout: keys repeated once per query head.
        repeated = keys.repeat_interleave(heads // kv_heads, dim=1)
        state = sample_state(wkv, length, 1, sample={})
        assert kept(state.select(LayerPrefill(0, 1, queries, repeated, repeated, 1.0))) == positions


# -- options, errors, the classifier -------------------------------------------------------------


def test_registered_with_every_option():
    assert get_method_class("windowkv") is WindowKV
    names = [option.name for option in WindowKV.option_specs()]
    assert names == ["capacity", "review_window_size", "shared_layers", "suffix_max", "suffix_avg", "beta", "task_type",
                     "classifier"]
    wkv = build_method("windowkv", capacity=512, task_type="qa")
    assert wkv.options()["review_window_size"] == 8 and wkv.options()["task_type"] == "qa"
    # SnapKV's observation window is not WindowKV's: refused, never silently dropped.
    with pytest.raises(KvbenchError, match="--window-size is not an option of windowkv"):
        build_method("windowkv", capacity=512, task_type="qa", window_size=3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"task_type": "summary"}, "--task-type must be one of auto, qa, other"),
        ({"review_window_size": 0}, "--review-window-size must be > 0"),
        ({"shared_layers": -1}, "--shared-layers must be > 0"),
        ({"suffix_max": 0}, "--suffix-max must be > 0"),
        ({"suffix_avg": 0}, "--suffix-avg must be > 0"),
        ({"beta": 0}, "--beta must be > 0"),
    ],
)
def test_bad_options(options, message):
    options.setdefault("task_type", "qa")
    with pytest.raises(KvbenchError, match=message):
        WindowKV(capacity=512, **options)


def test_capacity_too_small_for_the_groups():
    with pytest.raises(KvbenchError, match="needs --capacity >= 2"):
        method(capacity=1).prepare(ModelInfo("llama-3-8b", 32))  # last group: 1 * 8 // 14 = 0
    method(capacity=2).prepare(ModelInfo("llama-3-8b", 32))
    method(capacity=1).prepare(ModelInfo("tiny", 8))  # one group: the capacity itself
    with pytest.raises(KvbenchError, match="--shared-layers \\(28\\) must be below 2 x --beta"):
        method(capacity=512, shared_layers=28).prepare(ModelInfo("big", 64))
    with pytest.raises(KvbenchError, match="needs --capacity > 0"):
        method(capacity=0)


class FakeClassifier:
    digest = "sha256:fake"

    def __init__(self):
        self.seen = []

    def predict(self, text):
        self.seen.append(text)
        return "qa" if "Question" in text else "other"


def test_auto_classifies_every_sample(monkeypatch):
    import kvbench.classifier

    loaded = []
    fake = FakeClassifier()

    def load_classifier(path=None):
        loaded.append(path)
        return fake

    monkeypatch.setattr(kvbench.classifier, "load_classifier", load_classifier, raising=False)
    compressor = WindowKV(capacity=8, review_window_size=4, suffix_max=4, suffix_avg=4,
                          classifier="ckpt.pt").prepare(ModelInfo("tiny", 1))
    assert loaded == ["ckpt.pt"]  # before the first sample, once
    assert compressor.identity() == {"classifier": "sha256:fake"}
    for text, task_type, expected in (
        ("Question: who?", "qa", [4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19]),
        ("Summarize:", "other", [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]),
        ("Question: where?", "qa", [4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19]),
    ):
        state = compressor.start_sample(20, {"prompt_text": text, "task": "x"})
        assert kept(state.select(layer_from_weights(WEIGHTS, suffix=4))) == expected
        assert state.record()["task_type"] == task_type
    assert loaded == ["ckpt.pt"] and len(fake.seen) == 3
    with pytest.raises(KvbenchError, match="prompt text"):
        compressor.start_sample(20, {"task": "x"})


def test_auto_without_checkpoint_fails_before_the_first_sample(monkeypatch):
    import kvbench.classifier

    def load_classifier(path=None):
        raise KvbenchError("no task classifier checkpoint: run `kvbench train-classifier` or pass --task-type")

    monkeypatch.setattr(kvbench.classifier, "load_classifier", load_classifier, raising=False)
    with pytest.raises(KvbenchError, match="train-classifier"):
        WindowKV(capacity=512).prepare(ModelInfo("llama-3-8b", 32))
    WindowKV(capacity=512, task_type="other").prepare(ModelInfo("llama-3-8b", 32))  # no classifier needed


# -- the hook on a tiny random Llama -------------------------------------------------------------


def tiny_llama(num_layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_layers,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=512,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("task_type, suffix", [("qa", 32), ("other", 16)])
def test_prefill_cache_holds_group_budget_plus_suffix(task_type, suffix):
    from kvbench.engine.generate import generate_greedy
    from kvbench.engine.prefill import DecodeRequest, prefill

    model = tiny_llama(6)
    # Groups of 2: capacity 56, beta 14 -> last 8, first 104, step 48: budgets 104, 56, 8 (whole windows).
    wkv = WindowKV(capacity=56, shared_layers=2, task_type=task_type)
    prompt = torch.randint(3, 100, (160 + suffix,), generator=torch.Generator().manual_seed(1)).tolist()
    compressor = recording(wkv, 6)
    result = generate_greedy(model, prompt, compressor, max_new_tokens=3, eos_token_ids=set())
    expected = [104 + suffix] * 2 + [56 + suffix] * 2 + [8 + suffix] * 2
    assert result.kept_per_layer == expected
    assert len(result.token_ids) == 3
    assert compressor.last_sample.record() == {"task_type": task_type, "group_budgets": [104, 56, 8]}
    # The cache holds un-repeated KV heads.
    prefilled = prefill(model, compressor, DecodeRequest(prompt, 3, set()))
    assert [tuple(keys.shape) for keys, _ in prefilled.kept] == [(1, 2, n, 16) for n in expected]


def test_followers_store_the_leaders_positions_on_a_tiny_model():
    from kvbench.engine.generate import generate_greedy

    model = tiny_llama(5)  # groups of 2: layers 0-1, 2-3, 4 (shorter last group)
    compressor = recording(WindowKV(capacity=40, shared_layers=2, beta=7, task_type="qa"), 5)
    prompt = torch.randint(3, 100, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    result = generate_greedy(model, prompt, compressor, max_new_tokens=2, eos_token_ids=set())
    chosen = {layer_idx: selection.indices for layer_idx, selection in compressor.selections.items()}
    assert compressor.last_sample.record()["group_budgets"] == [69, 40, 11]
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[2], chosen[3])
    # 168 reviewable tokens: 168 - 13*8, 168 - 16*8, 168 - 20*8 kept, plus the 32 suffix tokens.
    assert result.kept_per_layer == [96, 96, 72, 72, 40]
    assert result.kept_per_layer == [chosen[i].shape[-1] for i in range(5)]
    for indices in chosen.values():
        assert (indices == indices[:, :1]).all()  # the same positions in both KV heads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    torch.manual_seed(4)
    keys = torch.randn(1, 2, 100, 8, dtype=dtype)
    layer = LayerPrefill(0, 1, torch.randn(1, 4, 100, 8, dtype=dtype), keys, keys, 1.0)
    wkv = method(capacity=40, task_type="qa")
    state = sample_state(wkv, 100, 1, sample={})
    positions = kept(state.select(layer))
    assert len(positions) == 40 + 32 and positions == sorted(set(positions))


# -- the reference's own loop, restated: kept positions must match it exactly --------------------


def reference_update_kv(queries, keys, suffix, window, budget, strategy):
    """optim996/WindowKV `compress_utils.WindowKVCluster.update_kv` for a group leader, restated from its code.

    ``keys`` are repeated per query head first (the reference's `repeat_kv` before `update_kv`). Returns the
    kept prompt positions, ascending (the reference concatenates kept windows in score order; as a set of
    positions that is the same choice).
    """
    _, num_heads, q_len, head_dim = queries.shape
    keys = keys.repeat_interleave(num_heads // keys.shape[1], dim=1)
    len_review = q_len - suffix
    if len_review <= budget:
        return list(range(q_len))
    attn_weights = torch.matmul(queries[..., -suffix:, :], keys.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((suffix, suffix), torch.finfo(attn_weights.dtype).min)
    mask_cond = torch.arange(mask.size(-1))
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    attn_weights[:, :, -suffix:, -suffix:] += mask[None, None, :, :]
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(queries.dtype)
    attn_weights_sum = attn_weights[:, :, -suffix:, :-suffix].sum(dim=-2)
    win_max_attn_scores = window // 2  # the reference's init_WindowKV for "max"
    num_windows = (len_review + window - 1) // window
    review_windows = []
    for _i in range(num_windows):
        start_idx = _i * window
        end_idx = min(start_idx + window, len_review)
        window_slice = attn_weights_sum[:, :, start_idx:end_idx]
        if strategy == "average":
            window_score = window_slice.mean().item()
        else:
            values, _ = torch.topk(window_slice, min(win_max_attn_scores, window_slice.shape[-1]))
            window_score = values.mean().item()
        review_windows.append((_i, window_score))
    bottom_k = math.ceil((len_review - budget) / window)
    if bottom_k * window >= len_review:
        return list(range(len_review, q_len))
    review_windows = sorted(review_windows, key=lambda x: x[1], reverse=True)[:-bottom_k]
    positions = [p for _i, _ in review_windows for p in range(_i * window, min(_i * window + window, len_review))]
    return sorted(positions) + list(range(len_review, q_len))


def kvbench_kept(queries, keys, suffix, window, budget, task_type):
    suffixes = {"suffix_max": suffix} if task_type == "qa" else {"suffix_avg": suffix}
    wkv = method(capacity=budget, review_window_size=window, task_type=task_type, **suffixes)
    state = sample_state(wkv, queries.shape[2], 1, sample={})
    selection = state.select(LayerPrefill(0, 1, queries, keys, keys.clone(), 1 / math.sqrt(queries.shape[-1])))
    return list(range(queries.shape[2])) if selection is None else kept(selection)


def test_uniform_attention_ties_break_as_in_the_reference():
    # 32 query heads over 8 KV heads, 18 tokens, suffix 8, windows of 3 (3,3,3,1 reviewable tokens), budget 8:
    # every vote is 1/18 (zero queries), so windows tie up to the fp32 rounding of each `window.mean()`. Reducing
    # the windows in another layout (a token-major copy) rounded them differently and kept 17 tokens, not 15.
    queries = torch.zeros(1, 32, 18, 64)
    keys = torch.zeros(1, 8, 18, 64)
    expected = [0, 1, 2, 3, 4, 5, 9] + list(range(10, 18))
    assert reference_update_kv(queries, keys, 8, 3, 8, "average") == expected
    assert kvbench_kept(queries, keys, 8, 3, 8, "other") == expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_window_scores_are_the_references_window_reductions_bit_for_bit(device):
    """On CUDA the windows' means replay as a CUDA graph per shape: the second round (graphs reused on new votes)
    must still give each window's own reduction."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(2 if device == "cuda" else 1):
        check_window_scores_bit_for_bit(generator, device)


def check_window_scores_bit_for_bit(generator, device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for length, windows in ((2, (3,)), (203, (1, 3, 8)), (4000, (8,))):
            votes = (torch.rand(1, 32, length, generator=generator).to(dtype) / 50).to(device)
            for window in windows:
                for strategy in ("average", "max"):
                    by_window = []
                    for start in range(0, length, window):
                        part = votes[:, :, start:start + window]
                        if strategy == "max":
                            part = torch.topk(part, min(max(1, window // 2), part.shape[-1]))[0]
                        by_window.append(part.mean())
                    scores = window_scores(votes, window, strategy)
                    assert scores.dtype == dtype
                    assert torch.equal(scores, torch.stack(by_window)), (dtype, length, window, strategy)


def random_configuration(generator, index):
    """A random (queries, keys, suffix, window, budget, task type): MHA or GQA, fp32/bf16/fp16, 18..400 tokens."""

    def pick(choices):
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    dtype = (torch.float32, torch.bfloat16, torch.float16)[index % 3]
    task_type = ("other", "qa")[index // 3 % 2]
    heads, kv_heads = pick([(4, 4), (8, 8), (8, 2), (32, 8), (12, 4)])
    head_dim = pick([8, 16, 64])
    window = pick([3, 8, 4, 5, 2])
    length = 18 if index % 5 == 0 else int(torch.randint(18, 401, (1,), generator=generator))
    suffix = int(torch.randint(1, min(33, length - 1), (1,), generator=generator))
    budget = int(torch.randint(1, length - suffix + 2, (1,), generator=generator))
    # Sharp, flat and exactly uniform attention: flat votes make fp16/bf16-rounded window scores tie often.
    scale = pick([0.0, 0.0, 0.05, 0.3, 1.0, 3.0])
    queries = (torch.randn(1, heads, length, head_dim, generator=generator) * scale).to(dtype)
    keys = torch.randn(1, kv_heads, length, head_dim, generator=generator).to(dtype)
    return queries, keys, suffix, window, budget, task_type


def test_kept_positions_match_the_reference_loop_on_random_configurations():
    generator = torch.Generator().manual_seed(2025)
    compressed = 0
    for index in range(150):
        queries, keys, suffix, window, budget, task_type = random_configuration(generator, index)
        strategy = "max" if task_type == "qa" else "average"
        expected = reference_update_kv(queries, keys, suffix, window, budget, strategy)
        compressed += len(expected) < queries.shape[2]
        assert kvbench_kept(queries, keys, suffix, window, budget, task_type) == expected, (
            index, queries.dtype, tuple(queries.shape), tuple(keys.shape), suffix, window, budget, task_type)
    assert compressed > 90


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["other", "qa"])
def test_every_layer_keeps_the_references_positions_on_a_real_trec_prompt(longbench_mini, task_type):
    """SmolLM2 (9 query heads over 3 KV heads, 30 layers) on a LongBench trec prompt: each layer's kept positions,
    as the engine stores them, are the reference's (leaders scored by its loop, followers reusing the leader's
    windows, budgets of the decaying groups). Few-shot scores near zero on this model are the method's own."""
    from kvbench.engine.generate import model_info
    from kvbench.harness.model import load_model
    from kvbench.engine.prefill import DecodeRequest, prefill
    from kvbench.tasks.longbench import LongBenchTask, load_task_samples

    loaded = load_model(None, dtype="fp32", device="cpu")
    task = LongBenchTask("trec")
    sample = load_task_samples("trec", longbench_mini)[0]
    prompt = task.prompt_ids(sample, loaded.tokenizer, 1500)
    wkv = WindowKV(capacity=128, task_type=task_type)
    compressor = RecordingCompressor(wkv.prepare(model_info(loaded.model)), keep_layers=True)
    request = DecodeRequest(prompt, 1, set(), {**sample, "prompt_text": task.prompt_text(sample)})
    prefilled = prefill(loaded.model, compressor, request)
    suffix, strategy = (32, "max") if task_type == "qa" else (16, "average")
    budgets = compressor.inner.budgets
    assert budgets == [183, 147, 111, 73]
    for layer_idx in range(30):
        if layer_idx % 8 == 0:
            layer = compressor.layers[layer_idx]
            leader = reference_update_kv(layer.queries, layer.keys, suffix, 8, budgets[layer_idx // 8], strategy)
        selection = compressor.selections[layer_idx]
        assert (None if selection is None else kept(selection)) == leader, layer_idx
        assert prefilled.kept_per_layer[layer_idx] == len(leader)
