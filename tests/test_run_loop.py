"""The run loop in process on a tiny random model: rows, scores, resume, and what makes a run folder refuse."""

import json

import pytest

from kvbench.errors import KvbenchError
from kvbench.harness.run import RunPlan, run_benchmark
from kvbench.methods import build_method
from kvbench.runfolder import RunLock, parse_result_file
from kvbench.tasks import build_tasks
from kvbench.tasks.evaluate import evaluate_path
from tests.method_helpers import crash_at_row
from tests.tiny_models import tiny_loaded_model

TASKS = "trec,multifieldqa_en"


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model("llama", num_layers=2)


def plan(tmp_path, data_dir, tasks=TASKS, limit=3, max_length=160, **task_options):
    return RunPlan(tasks=build_tasks(tasks, **task_options), data_dir=str(data_dir), limit=limit,
                   max_length=max_length, output_dir=tmp_path / "out")


def rows_of(run_dir, task):
    return parse_result_file(run_dir / f"{task}.jsonl")[0]


def test_rows_and_scores_of_a_run(loaded, tmp_path, longbench_mini):
    summary = run_benchmark(loaded, build_method("snapkv", capacity=32), plan(tmp_path, longbench_mini))
    run_dir = summary.run_dir
    assert run_dir == tmp_path / "out" / "tiny-llama" / "snapkv-32"
    gold = {json.loads(line)["_id"]: json.loads(line) for line in (longbench_mini / "trec.jsonl").open()}
    trec = rows_of(run_dir, "trec")
    assert [row["_id"] for row in trec] == list(gold)[:3]  # the first --limit samples, in order
    for row in trec:
        assert row["answers"] == gold[row["_id"]]["answers"] and "\n" not in row["pred"]
        assert row["prompt_tokens"] <= 160 and row["kept_tokens"] == {"mean": 32, "min": 32, "max": 32}
        assert 1 <= row["new_tokens"] <= 64
    scores = json.loads((run_dir / "scores.json").read_text())
    table = evaluate_path(run_dir).set_index("task")
    for task in ("trec", "multifieldqa_en"):
        assert scores[task]["n"] == 3
        assert scores[task]["score"] == pytest.approx(table.loc[task, "score"])
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["tasks"] == {"trec": 3, "multifieldqa_en": 3}
    identity = recorded["identity"]
    assert identity["options"]["capacity"] == 32 and recorded["max_length"] == 160
    assert identity["model"] == {"name": "tiny-llama", "test_model": "llama"}
    assert identity["scorer"] == {"code_sim_matcher": "levenshtein"}
    assert recorded["task_identity"]["trec"].keys() == {"sha256", "max_prompt_tokens"}
    assert recorded["task_identity"]["trec"]["max_prompt_tokens"] == 160
    assert summary.samples_done == 6


def test_the_longest_generations_are_prefilled_first(loaded, tmp_path, longbench_mini, monkeypatch):
    import kvbench.harness.run as run_module

    prefilled = []
    generate_stream = run_module.generate_stream

    def recording(model, methods, requests, *args, **kwargs):
        def recorded():
            for request in requests:
                prefilled.append((request.tag[0].name, request.max_new_tokens))
                yield request
        return generate_stream(model, methods, recorded(), *args, **kwargs)

    monkeypatch.setattr(run_module, "generate_stream", recording)
    # hotpotqa answers in 32 tokens, trec in 64, samsum in 128: the run takes them the other way round, each
    # task's samples in order
    run_benchmark(loaded, build_method("snapkv", capacity=32), plan(tmp_path, longbench_mini,
                                                                     tasks="hotpotqa,trec,samsum", limit=2))
    assert prefilled == [("samsum", 128)] * 2 + [("trec", 64)] * 2 + [("hotpotqa", 32)] * 2


def test_an_exception_mid_task_loses_no_finished_row_and_a_rerun_resumes(loaded, tmp_path, longbench_mini):
    uninterrupted = run_benchmark(loaded, build_method("pyramidkv", capacity=32), plan(tmp_path / "a", longbench_mini))
    expected = rows_of(uninterrupted.run_dir, "trec")

    with crash_at_row(2), pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(loaded, build_method("pyramidkv", capacity=32), plan(tmp_path / "b", longbench_mini))
    run_dir = tmp_path / "b" / "out" / "tiny-llama" / "pyramidkv-32"
    assert [row["_id"] for row in rows_of(run_dir, "trec")] == [expected[0]["_id"]]
    assert not (run_dir / "scores.json").exists()
    resumed = run_benchmark(loaded, build_method("pyramidkv", capacity=32), plan(tmp_path / "b", longbench_mini))
    assert resumed.samples_done == 5  # the first row was not redone
    strip = lambda rows: [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]  # noqa: E731
    assert strip(rows_of(run_dir, "trec")) == strip(expected)


def test_limit_may_grow_and_shrink(loaded, tmp_path, longbench_mini):
    method = build_method("snapkv", capacity=32)
    run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    grown = run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=2))
    assert grown.samples_done == 1 and len(rows_of(grown.run_dir, "trec")) == 2
    shrunk = run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    assert shrunk.samples_done == 0 and shrunk.scores["trec"]["n"] == 1


def test_a_folder_made_under_other_settings_is_refused_and_left_as_it_was(loaded, tmp_path, longbench_mini):
    method = build_method("snapkv", capacity=32)
    first = run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    run_file = first.run_dir / "run.json"
    before = run_file.read_bytes()
    with pytest.raises(KvbenchError, match=r"holds rows made under other settings \(trec\.max_prompt_tokens: 160 -> 200\)"):
        run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1, max_length=200))
    with pytest.raises(KvbenchError, match=r"code_sim_matcher: \"levenshtein\" -> \"difflib\""):
        from kvbench.tasks.metrics import using_code_sim_matcher

        with using_code_sim_matcher("difflib"):
            run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    # other data under the same task name
    changed = tmp_path / "changed-data"
    changed.mkdir()
    lines = (longbench_mini / "trec.jsonl").read_text(encoding="utf-8").splitlines()
    (changed / "trec.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(KvbenchError, match=r"trec\.sha256"):
        run_benchmark(loaded, method, plan(tmp_path, changed, tasks="trec", limit=1))
    # another model of the same name
    other = tiny_loaded_model("llama", num_layers=2, seed=1)
    other.identity = {"test_model": "llama, other weights"}
    with pytest.raises(KvbenchError, match="model.test_model"):
        run_benchmark(other, method, plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    assert run_file.read_bytes() == before
    # new tasks join the folder: the needle test, whose rows --max-length does not change, with another one
    run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="lcc", limit=1))
    run_benchmark(loaded, method, plan(tmp_path, longbench_mini, tasks="needle", limit=None, max_length=None,
                                       lengths="600", depths="50"))
    assert json.loads(run_file.read_text())["tasks"] == {"trec": 1, "lcc": 1, "needle": 1}
    other_folder = run_benchmark(loaded, build_method("snapkv", capacity=32, kernel_size=3),
                                 plan(tmp_path, longbench_mini, tasks="trec", limit=1))
    assert other_folder.run_dir.name == "snapkv-32-kernel_size=3"


def test_a_folder_in_use_is_refused_in_one_line(loaded, tmp_path, longbench_mini):
    run_dir = tmp_path / "out" / "tiny-llama" / "snapkv-32"
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):
        with pytest.raises(KvbenchError, match="another kvbench process is running on this run folder"):
            run_benchmark(loaded, build_method("snapkv", capacity=32), plan(tmp_path, longbench_mini, tasks="trec"))
    assert not (run_dir / "run.json").exists()


def test_refusals_write_no_run_json(loaded, tmp_path, longbench_mini):
    needle = plan(tmp_path, longbench_mini, tasks="needle", max_length=None, lengths="5000")
    with pytest.raises(KvbenchError, match="exceeds the model's window of 1024 tokens"):
        run_benchmark(loaded, build_method("fullkv"), needle)
    assert not list((tmp_path / "out").rglob("run.json"))
    old = tmp_path / "out" / "tiny-llama" / "fullkv"
    old.mkdir(parents=True)
    (old / "run.json").write_text(json.dumps({"model": "tiny-llama", "method": "fullkv", "tasks": {"trec": 1}}))
    with pytest.raises(KvbenchError, match="written by another kvbench version"):
        run_benchmark(loaded, build_method("fullkv"), plan(tmp_path, longbench_mini, tasks="trec"))
