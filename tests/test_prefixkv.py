"""PrefixKV: the retention-level search, budgets, profiles, and runs on tiny random models."""

import json

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.engine.generate import generate_greedy
from kvbench.methods import build_method
from kvbench.methods import importance as importance_module
from kvbench.methods import prefixkv as prefixkv_module
from kvbench.harness.profile import profile_prefixkv
from kvbench.methods.base import LayerPrefill, ModelInfo
from kvbench.methods.prefixkv import (
    allocate_drops,
    config_path,
    exclusive_mass,
    read_config,
    search_layer_drops,
    write_config,
)
from tests.method_helpers import recording, sample_state
from tests.tiny_models import random_prompt, tiny_model

# Middle scores of a 3-layer toy (4 middle tokens each). Normalised, sorted, the mass ranked before
# each rank is: layer 0 [0, .4, .7, .9], layer 1 [0, .25, .5, .75], layer 2 [0, .7, .8, .9].
TOY = torch.tensor([[4.0, 3, 2, 1], [1, 1, 1, 1], [7, 1, 1, 1]])


def test_exclusive_mass_of_the_toy():
    expected = torch.tensor([[0, 0.4, 0.7, 0.9], [0, 0.25, 0.5, 0.75], [0, 0.7, 0.8, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(exclusive_mass(TOY), expected)


@pytest.mark.parametrize(
    "total, drops",
    [
        (0, [0, 0, 0]),
        (4, [1, 1, 2]),  # a level in (.75, .8]: layer 0 keeps 3 (0, .4, .7 < p), layer 1 3, layer 2 2
        (6, [2, 1, 3]),  # a level in (.5, .7]: keeps 2, 3, 1
        (9, [3, 3, 3]),  # a level in (0, .25]: one token each
        (12, [4, 4, 4]),
    ],
)
def test_search_gives_the_hand_computed_budgets_of_the_toy(total, drops):
    found, level = search_layer_drops(TOY, total)
    assert found == drops
    assert sum(found) == total


def top_by_mass(scores, total):
    """Exact answer by brute force: drop the `total` ranks needing the highest level (ties: lower layer)."""
    mass = exclusive_mass(scores)
    entries = sorted((-float(mass[layer, rank]), layer) for layer in range(mass.shape[0]) for rank in range(mass.shape[1]))
    drops = [0] * mass.shape[0]
    for _, layer in entries[:total]:
        drops[layer] += 1
    return drops


@pytest.mark.parametrize("seed", range(8))
def test_search_totals_are_exact_and_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    layers, middle = 5, 23
    if seed % 2:
        scores = torch.randint(0, 3, (layers, middle), generator=generator).float()  # many exact ties
        scores[1] = scores[0]  # two identical layers
    else:
        scores = torch.rand(layers, middle, generator=generator) ** 4
    for total in range(0, layers * middle + 1, 7):
        drops, _ = search_layer_drops(scores, total)
        assert sum(drops) == total
        assert all(0 <= d <= middle for d in drops)
        assert drops == top_by_mass(scores, total)


def test_identical_layers_split_a_tied_budget_lower_layer_first():
    scores = torch.tensor([[4.0, 3, 2, 1], [4.0, 3, 2, 1]])
    assert search_layer_drops(scores, 1)[0] == [1, 0]
    assert search_layer_drops(scores, 3)[0] == [2, 1]


def test_allocate_drops_is_proportional_exact_and_capped():
    assert allocate_drops([0.1, 0.2, 0.3], 12, 100) == [2, 4, 6]
    assert allocate_drops([0.1, 0.2, 0.3], 13, 100) == [2, 4, 7]  # largest remainder
    assert allocate_drops([0.0, 0.0], 5, 10) == [3, 2]  # no weight: uniform
    # layer 2 would get 15 > cap 8: clipped, the rest redistributed in proportion
    assert allocate_drops([0.1, 0.1, 0.8], 20, 8) == [6, 6, 8]
    assert sum(allocate_drops([0.3, 0.01, 0.2, 0.7], 37, 12)) == 37


# -- the method on hand-built layers ----------------------------------------------------------------

LENGTH = 14  # start 4 + middle 9 + protected 1
MIDDLE_SCORES = [
    [9.0, 1, 1, 1, 1, 1, 1, 1, 1],  # concentrated: few tokens reach any level
    [5.0, 4, 3, 3, 2, 2, 1, 1, 1],
    [1.0, 1, 1, 1, 1, 1, 1, 1, 1.5],  # flat: needs many tokens
]


def layer_scores(layer_idx):
    # Protected tokens get the lowest scores of all: they must be kept anyway.
    return torch.tensor([0.0] * 4 + MIDDLE_SCORES[layer_idx] + [0.0])


def layers():
    out = []
    for layer_idx in range(3):
        queries = torch.full((1, 4, LENGTH, 2), float(layer_idx))  # the fake score function reads the layer here
        keys = torch.randn(1, 2, LENGTH, 2)
        out.append(LayerPrefill(layer_idx, 3, queries, keys, torch.randn(1, 2, LENGTH, 2), 1.0))
    return out


@pytest.fixture
def fake_scores(monkeypatch):
    def scores(layer):
        return layer_scores(int(layer.queries[0, 0, 0, 0]))

    # the online pre-pass scores in the method's module, the offline selection through the shared ranking
    monkeypatch.setattr(prefixkv_module, "attention_importance", scores)
    monkeypatch.setattr(importance_module, "attention_importance", scores)


def run_online(method, length=LENGTH):
    """What the engine does for --prefix-config online: pre-pass observe() on every layer, then select().
    Returns the selections and the sample's state."""
    state = sample_state(method, length, 3)
    assert state.needs_scoring_pass
    built = layers()
    for layer in built:
        state.observe(layer)
    return [state.select(layer) for layer in built], state


def kept_positions(selections):
    return [list(range(LENGTH)) if s is None else s.indices[0, 0].tolist() for s in selections]


def test_online_budgets_sum_to_the_budget_and_differ_per_layer(fake_scores):
    method = build_method("prefixkv", capacity=8, prefix_config="online")  # drop 6 per layer on average
    selections, state = run_online(method)
    selections = kept_positions(selections)
    kept = [len(s) for s in selections]
    assert sum(kept) == 8 * 3
    assert kept[0] < kept[1] < kept[2]  # the concentrated layer keeps least
    assert kept == state.kept
    for positions, scores in zip(selections, MIDDLE_SCORES):
        assert positions[:4] == [0, 1, 2, 3] and positions[-1] == LENGTH - 1  # protected
        middle = [p - 4 for p in positions[4:-1]]
        dropped = [i for i in range(9) if i not in middle]
        assert min((scores[i] for i in middle), default=99) >= max((scores[i] for i in dropped), default=-1)
    record = state.record()
    assert record["budget_per_layer"] == kept
    assert (record["budget_mean"], record["budget_min"], record["budget_max"]) == (8.0, min(kept), max(kept))
    assert record["prefix_config"] == "online"


def test_gqa_keeps_one_index_set_per_layer_on_the_unrepeated_kv_heads(fake_scores):
    method = build_method("prefixkv", ratio=0.5, prefix_config="online")
    for selection in run_online(method)[0]:
        assert selection.indices.shape[:2] == (1, 2)  # 2 KV heads, not 4 query heads
        assert torch.equal(selection.indices[0, 0], selection.indices[0, 1])


def test_ratio_and_capacity_agree_on_the_same_sample(fake_scores, tmp_path):
    # capacity 8 of 14 drops 6 per layer, 18 in all; ratio 6/14 drops round(6/14 * 14 * 3) = 18
    online = [
        kept_positions(run_online(build_method("prefixkv", prefix_config="online", **budget))[0])
        for budget in ({"capacity": 8}, {"ratio": 6 / 14})
    ]
    assert online[0] == online[1]
    path = write_config(profile_dict([0.2, 0.4, 0.6]), tmp_path / "p.json")
    profiled = []
    for budget in ({"capacity": 8}, {"ratio": 6 / 14}):
        state = sample_state(build_method("prefixkv", prefix_config=str(path), **budget), LENGTH, 3)
        profiled.append(kept_positions([state.select(layer) for layer in layers()]))
    assert profiled[0] == profiled[1]
    assert [len(p) for p in profiled[0]] == [LENGTH - d for d in allocate_drops([0.2, 0.4, 0.6], 18, 9)]


def test_budget_beyond_the_middle_keeps_only_protected_tokens(fake_scores):
    method = build_method("prefixkv", capacity=1, prefix_config="online")
    for positions in kept_positions(run_online(method)[0]):
        assert positions == [0, 1, 2, 3, LENGTH - 1]


def test_uncompressed_samples_skip_the_pre_pass():
    state = sample_state(build_method("prefixkv", capacity=20, prefix_config="online"), LENGTH, 3)
    assert not state.needs_scoring_pass
    assert state.select(layers()[0]) is None


def test_online_without_the_pre_pass_is_a_clear_error(fake_scores):
    state = sample_state(build_method("prefixkv", ratio=0.5, prefix_config="online"), LENGTH, 3)
    with pytest.raises(KvbenchError, match="pre-pass"):
        state.select(layers()[0])


# -- profiles ---------------------------------------------------------------------------------------


def profile_dict(layer_ratios, model="tiny", ratio=0.5):
    return {"model": model, "num_layers": len(layer_ratios), "ratio": ratio, "layer_ratios": layer_ratios, "samples": 1}


def test_config_errors_are_one_line(tmp_path):
    def prepare(path, model=ModelInfo("tiny", 2)):
        return build_method("prefixkv", ratio=0.5, prefix_config=str(path)).prepare(model)

    with pytest.raises(KvbenchError, match="cannot read PrefixKV config"):
        prepare(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KvbenchError, match="not valid JSON"):
        prepare(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({**profile_dict([0.5, 0.5]), "num_layers": 3}))
    with pytest.raises(KvbenchError, match="layer_ratios must be num_layers"):
        prepare(tmp_path / "short.json")
    path = write_config(profile_dict([0.5, 0.5]), tmp_path / "two.json")
    with pytest.raises(KvbenchError, match="is for model tiny, not other"):
        prepare(path, ModelInfo("other", 2))
    with pytest.raises(KvbenchError, match="2 layers; this model has 4"):
        prepare(path, ModelInfo("tiny", 4))
    assert prepare(path).identity()["prefixkv_profiles"] == {"two.json": read_config(path)["sha256"]}


def test_missing_default_profile_names_the_profile_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_HOME", str(tmp_path))
    method = build_method("prefixkv", ratio=0.5)
    with pytest.raises(KvbenchError, match=r"no PrefixKV profile for tiny at ratio 0.5 .*: run `kvbench profile --method prefixkv --model <this run's --model> --ratio 0.5`"):
        method.prepare(ModelInfo("tiny", 3))


def test_default_profiles_by_ratio_and_nearest_ratio_for_capacity(tmp_path, monkeypatch, fake_scores):
    monkeypatch.setenv("KVBENCH_HOME", str(tmp_path))
    for ratio, shape in ((0.25, [0.1, 0.2, 0.3]), (0.5, [0.6, 0.5, 0.4])):
        write_config(profile_dict(shape, ratio=ratio), config_path("tiny", ratio))
    # another model whose name starts like this one's: its profiles are not candidates
    write_config(profile_dict([0.5, 0.5], model="tiny_0.5", ratio=0.4), config_path("tiny_0.5", 0.4))
    by_ratio = sample_state(build_method("prefixkv", ratio=0.25), LENGTH, 3)
    assert by_ratio.record()["prefix_config_ratio"] == 0.25
    by_capacity = sample_state(build_method("prefixkv", capacity=8), LENGTH, 3)  # 1 - 8/14 = 0.43: profile 0.5
    record = by_capacity.record()
    assert record["prefix_config_ratio"] == 0.5
    assert record["budget_dropped"] == 18
    assert record["budget_per_layer"][0] < record["budget_per_layer"][2]  # the 0.5 profile drops most in layer 0


# -- tiny random models through the engine ------------------------------------------------------------------


def test_online_run_on_a_tiny_gqa_model_holds_each_layer_at_its_budget_for_50_steps():
    model = tiny_model("llama", num_layers=3)
    with torch.no_grad():  # a peakier first layer, so the layers' budgets differ
        model.model.layers[0].self_attn.q_proj.weight.mul_(4)
    prompt = random_prompt(120)
    compressor = recording(build_method("prefixkv", capacity=60, prefix_config="online"), 3)
    generation = generate_greedy(model, prompt, compressor, 51, set())  # the engine runs the scoring pre-pass
    kept_per_layer = compressor.last_sample.kept
    assert generation.kept_per_layer == kept_per_layer
    assert sum(generation.kept_per_layer) == 60 * 3
    assert len(set(generation.kept_per_layer)) > 1
    assert len(compressor.evictions) == 50 * 3
    for layer_idx, cache_length, _, index in compressor.evictions:
        kept = kept_per_layer[layer_idx]
        assert cache_length == kept  # held at its size: one eviction per appended token
        assert index == (kept - 25 if kept > 25 else kept // 2)


def test_profile_on_a_tiny_model_and_run_with_it(tmp_path):
    model = tiny_model("llama", num_layers=3)
    prompts = [random_prompt(90, seed=s) for s in (1, 2)]
    config = profile_prefixkv(model, prompts, 0.5, model_name="tiny")
    assert (config["model"], config["num_layers"], config["ratio"], config["samples"]) == ("tiny", 3, 0.5, 2)
    assert sum(config["layer_ratios"]) == pytest.approx(1.5, abs=0.02)  # each sample drops 0.5 * L * 3
    path = write_config(config, tmp_path / "tiny.json")
    assert read_config(path)["layer_ratios"] == config["layer_ratios"]
    # --ratio 0.5 and --capacity 45 on a 90-token prompt: the same prefill. While decoding, --ratio grows
    # the cache by (1 - R) per token and --capacity holds it, so compare the decoding without eviction.
    results = []
    for budget in ({"ratio": 0.5}, {"capacity": 45}):
        method = build_method("prefixkv", prefix_config=str(path), decode_evict=False, **budget)
        results.append(generate_greedy(model, prompts[0], method.prepare(ModelInfo("tiny", 3)), 8, set()))
        assert sum(results[-1].kept_per_layer) == 45 * 3
    assert results[0].token_ids == results[1].token_ids
    assert results[0].kept_per_layer == results[1].kept_per_layer


# -- `kvbench profile` -------------------------------------------------------------------------------


def test_calibration_is_a_stratified_round_robin_sample():
    from kvbench.harness.profile import stratified_samples

    by_task = {"a": [{"_id": f"a{i}"} for i in range(5)], "b": [{"_id": "b0"}], "c": [{"_id": f"c{i}"} for i in range(3)]}
    chosen = stratified_samples(by_task, 6)
    assert [task for task, _ in chosen] == ["a", "b", "c", "a", "c", "a"]
    assert len({sample["_id"] for _, sample in chosen}) == 6
    assert stratified_samples(by_task, 6) == chosen  # seeded
    assert len(stratified_samples(by_task, 100)) == 9


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--ratio", "1.5"], "error: --ratio must be in [0, 1), got 1.5"),
        (["--ratio", "0.5", "--method", "elastic"], "error: only prefixkv has an offline profile"),
        (["--ratio", "0.5", "--samples", "0"], "error: --samples must be > 0"),
    ],
)
def test_profile_command_bad_input_is_one_line_exit_2(arguments, message):
    from click.testing import CliRunner

    from kvbench.cli import main

    result = CliRunner().invoke(main, ["profile", *arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_profile_command_then_run_finds_the_profile(longbench_mini, tmp_path):
    """The embedded model: `kvbench profile` writes the config where `run` looks; a run then uses it."""
    from click.testing import CliRunner

    from kvbench.cli import main

    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["profile", "--ratio", "0.5", "--data-dir", str(longbench_mini), "--samples", "2",
                                       "--tasks", "trec,qasper", "--max-length", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert config["samples"] == 2 and len(config["layer_ratios"]) == config["num_layers"]
    assert [s.split(":")[0] for s in config["calibration"]["samples"]] == ["trec", "qasper"]
    method = build_method("prefixkv", ratio=0.5, prefix_config=str(out))
    method.prepare(ModelInfo(config["model"], config["num_layers"]))


def test_online_ratio_and_capacity_agree_through_the_engine():
    model = tiny_model("llama", num_layers=3)
    prompt = random_prompt(120)
    runs = [
        generate_greedy(model, prompt, build_method("prefixkv", prefix_config="online", decode_evict=False, **budget), 6, set())
        for budget in ({"ratio": 0.5}, {"capacity": 60})
    ]
    assert runs[0].kept_per_layer == runs[1].kept_per_layer
    assert sum(runs[0].kept_per_layer) == 60 * 3
    assert runs[0].token_ids == runs[1].token_ids
