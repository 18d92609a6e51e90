"""A grid shares one prefill per sample: each folder gets, token for token, what a run of its configuration alone writes.

Every method at two capacities (PrefixKV online and from an offline profile, Elastic Cache evicting
while decoding, WindowKV with its task classifier), in fp32 on tiny random Llama, Mistral and Qwen2
models; also after a crash mid-grid and a resume, with some folders complete before the grid, and
question-agnostic (the context prefilled once, the question extending each configuration's own cache).
"""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kvbench.classifier
from kvbench.engine import generate as generate_module
from kvbench.engine import prefill as prefill_module
from kvbench.engine.decode import slots_needed
from kvbench.engine.generate import as_compressor, generate_stream, model_info
from kvbench.harness.bench import grid_configurations
from kvbench.engine.prefill import DecodeRequest, prefill, prefill_shared
from kvbench.harness.model import ModelDescription
from kvbench.harness.run import RunPlan, execute_runs, open_run, run_benchmark
from kvbench.methods import build_method, h2o
from kvbench.methods import importance
from kvbench.methods import pyramidkv as pyramidkv_module
from kvbench.methods import snapkv as snapkv_module
from kvbench.methods import windowkv as windowkv_module
from kvbench.methods.base import LayerPrefill
from kvbench.methods.prefixkv import write_config
from kvbench.runfolder import RUN_FILE, SCORES_FILE, parse_result_file
from kvbench.tasks import build_tasks
from tests.method_helpers import crash_at_row, sample_state
from tests.test_decode import requests_of
from tests.tiny_models import FAMILIES, random_prompt, tiny_loaded_model, tiny_model

TASKS = ("hotpotqa", "passage_count")  # 32 generated tokens each
CAPACITIES = (24, 48)
NUM_LAYERS = 2
#: what differs between two runs of the same rows: the clock
TIMING_FIELDS = {"prefill_seconds", "decode_seconds"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and spares the cores other work shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingClassifier:
    """WindowKV's task classifier, faked: QA prompts by a word of theirs, each question counted."""

    digest = "sha256:counting"

    def __init__(self):
        self.asked = []

    def predict(self, text):
        self.asked.append(text)
        return "qa" if "Question" in text else "other"


@pytest.fixture
def classifier(monkeypatch):
    fake = CountingClassifier()
    monkeypatch.setattr(kvbench.classifier, "load_classifier", lambda path=None: fake, raising=False)
    return fake


def grid_of(family, tmp_path):
    """fullkv, and every other method at each capacity; PrefixKV twice (online, and an offline profile)."""
    profile = write_config({"model": f"tiny-{family}", "num_layers": NUM_LAYERS, "ratio": 0.6,
                            "layer_ratios": [0.4, 0.8], "samples": 0}, tmp_path / "profile.json")
    methods = [build_method("fullkv")]
    for capacity in CAPACITIES:
        methods += [
            build_method("streamingllm", capacity=capacity),
            build_method("h2o", capacity=capacity),
            build_method("snapkv", capacity=capacity),
            build_method("pyramidkv", capacity=capacity),
            build_method("windowkv", capacity=capacity, shared_layers=2, review_window_size=4, suffix_max=8,
                         suffix_avg=4, classifier="fake"),
            build_method("prefixkv", capacity=capacity, prefix_config="online"),
            build_method("prefixkv", capacity=capacity, prefix_config=str(profile)),
            build_method("elastic", capacity=capacity),
        ]
    return methods


def plan(out, data_dir, limit=2, max_length=150, question_agnostic=False):
    return RunPlan(tasks=build_tasks(",".join(TASKS)), data_dir=str(data_dir), limit=limit, max_length=max_length,
                   output_dir=out, question_agnostic=question_agnostic)


def run_grid_in_process(loaded, methods, plan, batch_size=16):
    shared = {}
    runs = [open_run(ModelDescription.of(loaded), method, method.prepare(loaded.info, shared), plan)
            for method in methods]
    try:
        return execute_runs(runs, loaded, batch_size=batch_size)
    finally:
        for run in runs:
            run.close()


def folder_contents(run_dir, tasks=TASKS):
    """A folder as a comparison sees it: each task's rows by _id without their timings, run.json, scores.json."""
    rows = {}
    for task in tasks:
        parsed = parse_result_file(run_dir / f"{task}.jsonl")[0]
        assert len({row["_id"] for row in parsed}) == len(parsed)  # nothing written twice
        rows[task] = {row["_id"]: {k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in parsed}
    return rows, json.loads((run_dir / RUN_FILE).read_text()), json.loads((run_dir / SCORES_FILE).read_text())


def separate_runs(loaded, methods, out, data_dir, **plan_options):
    return {summary.run_dir.name: folder_contents(summary.run_dir)
            for summary in (run_benchmark(loaded, method, plan(out, data_dir, **plan_options), batch_size=4)
                            for method in methods)}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_grid_writes_what_separate_runs_write(family, tmp_path, longbench_mini, classifier):
    loaded = tiny_loaded_model(family, num_layers=NUM_LAYERS)
    methods = grid_of(family, tmp_path)
    expected = separate_runs(loaded, methods, tmp_path / "separate", longbench_mini)
    asked_alone = len(classifier.asked)
    summaries = run_grid_in_process(loaded, methods, plan(tmp_path / "grid", longbench_mini))
    assert len(expected) == len(methods) == 17
    assert {summary.run_dir.name: folder_contents(summary.run_dir) for summary in summaries} == expected
    assert [summary.samples_done for summary in summaries] == [len(TASKS) * 2] * len(methods)
    # separately each WindowKV run classifies each sample; the grid once per sample for both capacities
    assert asked_alone == 2 * len(TASKS) * 2
    assert len(classifier.asked) - asked_alone == len(TASKS) * 2
    # the budgets really differ: not every folder holds the same predictions
    predictions = {json.dumps(rows, sort_keys=True) for rows, _, _ in expected.values()}
    assert len(predictions) > len(methods) // 2


@pytest.mark.slow
def test_a_grid_killed_midway_resumes_each_folder_and_skips_complete_ones(tmp_path, longbench_mini, classifier,
                                                                          monkeypatch):
    loaded = tiny_loaded_model("llama", num_layers=NUM_LAYERS)
    methods = grid_of("llama", tmp_path)
    expected = separate_runs(loaded, methods, tmp_path / "separate", longbench_mini)
    out = tmp_path / "grid"
    # two folders complete before the grid starts, one holding a single row
    for method in methods[3:5]:
        run_benchmark(loaded, method, plan(out, longbench_mini), batch_size=4)
    run_benchmark(loaded, methods[7], plan(out, longbench_mini, limit=1), batch_size=4)

    with crash_at_row(21), pytest.raises(RuntimeError, match="simulated crash"):  # after 20 rows
        run_grid_in_process(loaded, methods, plan(out, longbench_mini))

    prefilled = []
    real_prefill = generate_module.prefill_shared

    def counting_prefill(model, compressors, request, *args, **options):
        prefilled.append(request.configurations)
        return real_prefill(model, compressors, request, *args, **options)

    monkeypatch.setattr(generate_module, "prefill_shared", counting_prefill)
    summaries = run_grid_in_process(loaded, methods, plan(out, longbench_mini))
    rows_before = 2 * 4 + 2 + 20  # two complete folders, one row of each task in a third, the crash's rows
    assert sum(summary.samples_done for summary in summaries) == len(methods) * 4 - rows_before
    assert 1 <= len(prefilled) <= 4  # each sample once at most, for exactly the folders lacking it
    assert all(3 not in configurations and 4 not in configurations for configurations in prefilled)
    assert {summary.run_dir.name: folder_contents(summary.run_dir) for summary in summaries} == expected


def test_a_question_agnostic_grid_writes_what_separate_question_agnostic_runs_write(tmp_path, longbench_mini,
                                                                                    monkeypatch):
    """Each sample's context is prefilled once for the three configurations, its question extended over each
    one's cache: every folder holds, token for token, what its configuration's question-agnostic run writes."""
    loaded = tiny_loaded_model("llama", num_layers=NUM_LAYERS)
    methods = [build_method("snapkv", capacity=24), build_method("snapkv", capacity=48), build_method("fullkv")]
    options = dict(max_length=400, question_agnostic=True)  # room for passage_count's long question part
    expected = separate_runs(loaded, methods, tmp_path / "separate", longbench_mini, **options)
    assert sorted(expected) == ["fullkv-question-agnostic", "snapkv-24-question-agnostic",
                                "snapkv-48-question-agnostic"]
    prefilled, extended = [], []
    real_prefill, real_extend = generate_module.prefill_shared, prefill_module.extend

    def counting_prefill(model, compressors, request, *args, **options):
        prefilled.append((request.configurations, request.question_start))
        return real_prefill(model, compressors, request, *args, **options)

    def counting_extend(model, kept, new_ids, first_position):
        extended.append(first_position)
        return real_extend(model, kept, new_ids, first_position)

    monkeypatch.setattr(generate_module, "prefill_shared", counting_prefill)
    monkeypatch.setattr(prefill_module, "extend", counting_extend)
    summaries = run_grid_in_process(loaded, methods, plan(tmp_path / "grid", longbench_mini, **options))
    assert {summary.run_dir.name: folder_contents(summary.run_dir) for summary in summaries} == expected
    samples = len(TASKS) * 2
    assert len(prefilled) == samples and all(
        configurations == (0, 1, 2) and question_start is not None for configurations, question_start in prefilled)
    assert len(extended) == samples * len(methods)
    assert all(run_json["question_agnostic"] is True for _, run_json, _ in expected.values())
    # the budgets really differ: the snapkv folders and fullkv's hold different caches
    kept = {name: [row["kept_tokens"] for rows in contents[0].values() for row in rows.values()]
            for name, contents in expected.items()}
    assert len({json.dumps(value) for value in kept.values()}) == len(methods)


def test_a_question_agnostic_ruler_grid_writes_what_separate_runs_write(tmp_path):
    """RULER too: split where its prompt_parts splits, and each configuration's row gets the sample's answers."""
    loaded = tiny_loaded_model("llama", num_layers=NUM_LAYERS)
    methods = [build_method("snapkv", capacity=24), build_method("fullkv")]

    def ruler_plan(out):
        return RunPlan(tasks=build_tasks("niah_single_1", lengths="1024", num_samples=2), output_dir=out,
                       question_agnostic=True)

    expected = {summary.run_dir.name: folder_contents(summary.run_dir, ["niah_single_1"])
                for summary in (run_benchmark(loaded, method, ruler_plan(tmp_path / "separate"), batch_size=4)
                                for method in methods)}
    summaries = run_grid_in_process(loaded, methods, ruler_plan(tmp_path / "grid"))
    assert {summary.run_dir.name: folder_contents(summary.run_dir, ["niah_single_1"])
            for summary in summaries} == expected
    assert [summary.samples_done for summary in summaries] == [2, 2]
    assert all(row["answers"] for rows, _, _ in expected.values() for row in rows["niah_single_1"].values())


def test_a_shared_question_agnostic_prefill_gives_each_configuration_its_own_cache_and_first_token():
    """The engine alone: the question extends each configuration's compressed cache, so the first token comes
    from each configuration's own extend (they differ by configuration) and equals a prefill of it alone."""
    model = tiny_model("llama", num_layers=2)
    compressors = [as_compressor(build_method("snapkv", capacity=16), model),
                   as_compressor(build_method("streamingllm", capacity=16), model),
                   as_compressor(build_method("fullkv"), model)]
    first_tokens = []
    for seed in range(8):
        request = DecodeRequest(random_prompt(90, seed=seed), 4, set(), question_start=70, configurations=(0, 1, 2))
        shared = prefill_shared(model, compressors, request)
        assert [one.configuration for one in shared] == [0, 1, 2]
        for one in shared:
            alone = prefill(model, compressors[one.configuration], replace(request, configurations=(0,)))
            assert one.first_token == alone.first_token
            assert one.kept_per_layer == alone.kept_per_layer == [
                (16 if one.configuration < 2 else 70) + 20] * 2  # the question's 20 tokens kept whole
            assert all(torch.equal(shared_keys, alone_keys) and torch.equal(shared_values, alone_values)
                       for (shared_keys, shared_values), (alone_keys, alone_values) in zip(one.kept, alone.kept))
        first_tokens.append([one.first_token for one in shared])
    assert any(len(set(tokens)) > 1 for tokens in first_tokens)


def test_rows_of_several_configurations_decode_in_one_batch():
    """The engine alone: two configurations named by each request, a batch smaller than their rows; each
    configuration's tokens are those it gives decoding alone."""
    model = tiny_model("llama", num_layers=2)
    methods = [build_method("snapkv", capacity=32), build_method("elastic", capacity=40)]
    lengths, new_tokens = [90, 30, 120, 64], [10, 3, 12, 6]
    alone = [{r.tag: r.token_ids for r in generate_stream(model, method, requests_of(lengths, new_tokens), 1)}
             for method in methods]
    requests = requests_of(lengths, new_tokens)
    for request in requests:
        request.configurations = (0, 1)
    results = list(generate_stream(model, methods, requests, 3))
    assert sorted((r.configuration, r.tag) for r in results) == [(c, t) for c in (0, 1) for t in range(4)]
    for result in results:
        assert result.token_ids == alone[result.configuration][result.tag]
        assert result.prefill_cost_seconds == pytest.approx(result.prefill_seconds / 2)


def test_rows_that_memory_cannot_hold_are_scheduled_not_refused(monkeypatch):
    """Free memory holding a pool of 12 pages (the CUDA bound, simulated) under a batch of 8 rows: caches wait for
    rows to finish and give their pages back, it is said once, and every configuration's tokens stay those it
    gives alone."""
    model = tiny_model("llama", num_layers=2)
    methods = [build_method("fullkv"), build_method("snapkv", capacity=32)]
    lengths, new_tokens = [30, 290, 120, 64], [10, 3, 12, 6]  # the second's full cache takes 5 pages
    alone = [{r.tag: r.token_ids for r in generate_stream(model, method, requests_of(lengths, new_tokens), 1)}
             for method in methods]
    memory_pages = 12
    monkeypatch.setattr(generate_module, "_pool_pages", lambda batch, required, room: memory_pages)
    requests = requests_of(lengths, new_tokens)
    for request in requests:
        request.configurations = (0, 1)
    said = []
    results = list(generate_stream(model, methods, requests, 8, say=said.append))
    assert {(r.configuration, r.tag): r.token_ids for r in results} == {
        (configuration, tag): tokens for configuration, by_tag in enumerate(alone) for tag, tokens in by_tag.items()}
    assert len(said) == 1 and said[0].startswith("decode rows bounded by GPU memory: ")


def random_layer_inputs(query_heads, kv_heads, length, head_dim):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, query_heads, length, head_dim, generator=generator)
    return queries, torch.randn(1, kv_heads, length, head_dim, generator=generator)


def test_one_layer_is_scored_once_for_every_method_and_capacity_that_ranks_by_its_mass(monkeypatch, tmp_path):
    # H2O, Elastic Cache and PrefixKV at two capacities each rank by the same attention mass: a grid computes
    # it once per layer (and Elastic's and PrefixKV's ranking of it, sorted once for the four, and H2O's per-head
    # ranking once for its two), and every
    # selection is what the method makes on a layer of its own.
    queries, keys = random_layer_inputs(8, 2, 45, 32)
    values = torch.randn_like(keys)
    profile = tmp_path / "profile.json"
    write_config({"model": "tiny", "num_layers": 1, "ratio": 0.5, "layer_ratios": [0.5], "samples": 0}, profile)
    methods = [build_method(name, capacity=capacity, **({"prefix_config": str(profile)} if name == "prefixkv" else {}))
               for name in ("h2o", "elastic", "prefixkv") for capacity in (16, 30)]
    alone = [sample_state(method, 45).select(LayerPrefill(0, 1, queries, keys, values, 32**-0.5)) for method in methods]
    calls = []
    counted = importance.attention_mass_sums
    monkeypatch.setattr(importance, "attention_mass_sums", lambda *args: calls.append(1) or counted(*args))
    rankings = []
    ranked = importance.rank_middle
    monkeypatch.setattr(importance, "rank_middle", lambda *args: rankings.append(1) or ranked(*args))
    heavy_hitter_rankings = []
    heavy_hitter_ranked = h2o.heavy_hitter_ranking
    monkeypatch.setattr(h2o, "heavy_hitter_ranking",
                        lambda *args: heavy_hitter_rankings.append(1) or heavy_hitter_ranked(*args))
    shared_layer = LayerPrefill(0, 1, queries, keys, values, 32**-0.5)
    together = [sample_state(method, 45).select(shared_layer) for method in methods]
    assert len(calls) == 1 and len(rankings) == 1 and len(heavy_hitter_rankings) == 1
    for own, shared in zip(alone, together):
        assert torch.equal(own.indices, shared.indices)
        assert (own.keys is None) == (shared.keys is None)
        if own.keys is not None:
            assert torch.equal(own.keys, shared.keys) and torch.equal(own.values, shared.values)


def test_a_shared_result_is_computed_once_per_layer_and_arguments():
    queries, keys = random_layer_inputs(4, 2, 10, 8)
    layer = LayerPrefill(0, 1, queries, keys, keys, 1.0)
    calls = []

    def score(layer, window):
        calls.append(window)
        return layer.keys[..., -window:, :].sum()

    assert layer.shared(score, 3) is layer.shared(score, 3)
    assert torch.equal(layer.shared(score, 5), keys[..., -5:, :].sum())
    assert calls == [3, 5]
    assert LayerPrefill(0, 1, queries, keys, keys, 1.0).shared(score, 3) is not layer.shared(score, 3)  # per layer


def test_window_votes_are_computed_once_per_layer_for_every_capacity(monkeypatch):
    # SnapKV and PyramidKV vote alike, WindowKV scores its review windows alike, at every capacity
    queries, keys = random_layer_inputs(8, 2, 80, 32)
    values = torch.randn_like(keys)
    methods = [build_method(name, capacity=capacity, **({"task_type": "other"} if name == "windowkv" else {}))
               for name in ("snapkv", "pyramidkv", "windowkv") for capacity in (16, 30)]
    alone = [sample_state(method, 80).select(LayerPrefill(0, 1, queries, keys, values, 32**-0.5)) for method in methods]
    calls = []

    def counted(function):
        return lambda *args: calls.append(function.__name__) or function(*args)

    votes = counted(snapkv_module.pooled_window_votes)
    monkeypatch.setattr(snapkv_module, "pooled_window_votes", votes)
    monkeypatch.setattr(pyramidkv_module, "pooled_window_votes", votes)
    monkeypatch.setattr(windowkv_module, "review_window_scores", counted(windowkv_module.review_window_scores))
    shared_layer = LayerPrefill(0, 1, queries, keys, values, 32**-0.5)
    together = [sample_state(method, 80).select(shared_layer) for method in methods]
    assert sorted(calls) == ["pooled_window_votes", "review_window_scores"]
    for own, shared in zip(alone, together):
        assert torch.equal(own.indices, shared.indices)


def test_the_gpu_grid_profile_runs_on_a_tiny_model():
    """tests/gpu/grid_profile.py's measurement, on CPU, so that it works on its first GPU run."""
    spec = importlib.util.spec_from_file_location("grid_profile_gpu", Path(__file__).parent / "gpu" / "grid_profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = tiny_model("llama", num_layers=NUM_LAYERS)
    configurations = grid_configurations(["fullkv", "h2o", "elastic"], list(CAPACITIES))
    requests = [DecodeRequest(random_prompt(90 + 10 * index), 4, set(), {"task": "hotpotqa", "prompt_text": ""},
                              tag=("hotpotqa", str(index))) for index in range(2)]
    table = script.measure(model, model_info(model), configurations, requests, say=lambda line: None).set_index("part")
    assert table.loc["grid prefill", "share_of_grid_prefill"] == 1
    assert table.loc["select elastic", "configurations"] == 2 and table.loc["select fullkv", "configurations"] == 1
    # the selections happen inside the grid prefill, which also runs the forward pass
    selections = table.loc[table.index.str.startswith("select"), "mean_s_per_sample"].sum()
    assert 0 < selections < table.loc["grid prefill", "mean_s_per_sample"]
    assert table.loc["forward alone", "mean_s_per_sample"] > 0
