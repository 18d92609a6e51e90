"""`kvbench run` end to end on the embedded SmolLM2, resumability, and its one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.runfolder import append_row, read_rows_for_resume
from kvbench.tasks.evaluate import evaluate_path

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


def kvbench(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, **kwargs)


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["_id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_snapkv_run_on_real_samples_writes_rows_and_scores(tmp_path, longbench_mini):
    result = kvbench("run", "--method", "snapkv", "--capacity", "64", "--tasks", "trec,multifieldqa_en",
                     "--data-dir", str(longbench_mini), "--limit", "1", "--max-length", "1500",
                     "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / MODEL_NAME / "snapkv-64"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["method"] == "snapkv" and run["capacity"] == 64 and run["tasks"] == {"trec": 1, "multifieldqa_en": 1}
    gold = {json.loads(line)["_id"]: json.loads(line) for line in (longbench_mini / "trec.jsonl").open()}
    (row,) = [json.loads(line) for line in (run_dir / "trec.jsonl").open()]
    assert row["_id"] in gold and row["answers"] == gold[row["_id"]]["answers"]
    assert row["all_classes"] == gold[row["_id"]]["all_classes"]
    assert "\n" not in row["pred"]  # trec keeps the first line only
    assert row["prompt_tokens"] <= 1500 and row["prompt_tokens"] > 64
    assert row["kept_tokens"] == {"mean": 64, "min": 64, "max": 64}
    assert row["prefill_seconds"] > 0 and row["kv_cache_mb"] > 0
    scores = json.loads((run_dir / "scores.json").read_text())
    table = evaluate_path(run_dir).set_index("task")
    for task in ("trec", "multifieldqa_en"):
        assert scores[task]["n"] == 1
        assert scores[task]["score"] == pytest.approx(table.loc[task, "score"])
    assert "trec" in result.stdout and "multifieldqa_en" in result.stdout


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_samples(tmp_path, longbench_mini):
    args = ["run", "--method", "pyramidkv", "--capacity", "48", "--tasks", "samsum", "--data-dir", str(longbench_mini),
            "--limit", "3", "--max-length", "600", "--output", str(tmp_path)]
    rows_file = tmp_path / MODEL_NAME / "pyramidkv-48" / "samsum.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "kvbench", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (rows_file.is_file() and rows_file.stat().st_size > 0):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_ids = jsonl_ids(rows_file)
    assert 1 <= len(first_ids) < 3
    result = kvbench(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = jsonl_ids(rows_file)
    assert len(ids) == 3 and len(set(ids)) == 3 and ids[: len(first_ids)] == first_ids


def test_a_line_cut_by_a_kill_is_dropped_and_rewritten(tmp_path):
    path = tmp_path / "task.jsonl"
    append_row(path, {"_id": "a", "pred": "x"})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"_id": "b", "pr')
    assert [row["_id"] for row in read_rows_for_resume(path)] == ["a"]
    append_row(path, {"_id": "b", "pred": "y"})
    assert [row["_id"] for row in read_rows_for_resume(path)] == ["a", "b"]


def test_a_line_cut_inside_a_multibyte_character_is_dropped_too(tmp_path):
    path = tmp_path / "task.jsonl"
    append_row(path, {"_id": "a", "pred": "雨"})
    cut = ('{"_id": "b", "pred": "雨"}\n'.encode("utf-8"))[:-3]  # inside the 3-byte character
    with open(path, "ab") as handle:
        handle.write(cut)
    assert [row["_id"] for row in read_rows_for_resume(path)] == ["a"]
    assert path.read_bytes().endswith(b"}\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nosuch", "--capacity", "64"], "unknown method 'nosuch'; known methods:"),
        (["--method", "snapkv", "--capacity", "64", "--beta", "5"], "--beta is not an option of snapkv"),
        (["--method", "snapkv", "--capacity", "64", "--ratio", "0.5"], "--ratio is not an option of snapkv"),
        (["--method", "fullkv", "--capacity", "64"], "fullkv keeps every token and takes no capacity"),
        (["--method", "snapkv", "--capacity", "64", "--tasks", "trec", "--lengths", "1000"],
         "--lengths applies to no task"),
        (["--method", "snapkv", "--capacity", "64,x"], "--capacity must be a comma list of integers"),
        (["--method", "snapkv,pyramidkv", "--capacity", "64", "--merge"], "--merge is not an option of snapkv, pyramidkv"),
        (["--method", "fullkv", "--tasks", "trec", "--device-map", "garbage"], "--device-map must be one of"),
        (["--method", "fullkv", "--tasks", "trec", "--model", "/"], "has no config.json"),
        (["--method", "snapkv", "--capacity", "0"], "--capacity > 0"),
        (["--method", "snapkv"], "needs --capacity > 0"),
        (["--method", "snapkv", "--capacity", "4"], "larger than the observation window"),
        (["--method", "snapkv", "--capacity", "64", "--tasks", "nosuch"], "nosuch"),
        (["--method", "fullkv", "--tasks", "trec", "--model", "/no/such/model"], "model path not found"),
        (["--method", "fullkv", "--tasks", "trec", "--model", "/no/such/model.gguf"], "model file not found"),
        (["--method", "fullkv", "--tasks", "trec", "--attn", "flash_attention_2"], "flash"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(main, ["run", *args, "--output", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("configured", [None, "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_commands_let_the_cuda_allocator_grow_segments_unless_the_user_configured_it(configured, monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's end restores what was there
        monkeypatch.delenv(name)
    if configured:
        monkeypatch.setenv(configured, "max_split_size_mb:128")
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0
    expected = {None: "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}.get(configured)
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


LAUNCHED = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29518"}


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"RANK": "5", "WORLD_SIZE": "2", **LAUNCHED}, "RANK=5 with WORLD_SIZE=2: the rank must be from 0 to 1"),
        ({"RANK": "-1", "WORLD_SIZE": "2", **LAUNCHED}, "RANK=-1 with WORLD_SIZE=2"),
        ({"RANK": "1"}, "RANK=1 with WORLD_SIZE=1"),
        ({"WORLD_SIZE": "2", **LAUNCHED}, "WORLD_SIZE=2 without RANK"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a launch has at least one process"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' must be a whole number"),
        ({"RANK": "0.5", "WORLD_SIZE": "2", **LAUNCHED}, "RANK='0.5' must be a whole number"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", **LAUNCHED}, "LOCAL_RANK=2 with 2 process(es)"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", **LAUNCHED}, "LOCAL_RANK=-1"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "3", **LAUNCHED},
         "LOCAL_RANK=3 with 2 process(es) on this machine"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3", **LAUNCHED}, "LOCAL_WORLD_SIZE=3 with WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
         "MASTER_PORT='http' must be a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
         "MASTER_PORT=70000 must be a port number"),
    ],
)
def test_inconsistent_launch_variables_are_one_line_before_the_rendezvous(variables, message, tmp_path):
    """torch's rendezvous would answer these with a traceback, or wait for processes that never come."""
    from kvbench.harness.parallel import LAUNCH_VARIABLES

    environment = {**{name: None for name in LAUNCH_VARIABLES}, **variables}
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--output", str(tmp_path)],
                                env=environment)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert time.perf_counter() - started < 30  # refused before the model loads, not after a rendezvous timeout
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all"])
def test_an_empty_or_garbage_gguf_is_one_line(tmp_path, content):
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(content)
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--model", str(gguf_file),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not a GGUF file" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_corrupt_checkpoint_is_one_line(tmp_path):
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                                                    "num_attention_heads": 4, "intermediate_size": 128,
                                                    "vocab_size": 128}))
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--model", str(folder),
                                       "--data-dir", str(tmp_path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    output = blocker if where == "file" else blocker / "sub"
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--output", str(output),
                                       "--model", "/no/such/model"])
    assert result.exit_code == 2
    assert ("is a file" if where == "file" else "lies under the file") in result.output


def test_gguf_without_the_gguf_package_is_one_line(tmp_path, monkeypatch):
    from kvbench.harness import model as model_module

    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setattr(model_module, "module_available", lambda name: name != "gguf")
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--model", str(gguf_file),
                                       "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs the gguf package" in result.output


@pytest.mark.slow
def test_two_processes_fill_each_folder_of_a_grid_with_the_rows_of_one(tmp_path, longbench_mini):
    """torchrun with 2 CPU processes over a grid: each takes half the samples and shares their prefills across
    the grid; each folder ends with the rows a single process makes, each once, and scores.json over all of them."""
    from tests.tiny_models import tiny_loaded_model

    loaded = tiny_loaded_model("llama", num_layers=2)
    model_dir = tmp_path / "tiny-model"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    args = ["run", "--model", str(model_dir), "--method", "snapkv,h2o", "--capacity", "32", "--tasks", "trec,lcc",
            "--data-dir", str(longbench_mini), "--limit", "5", "--max-length", "160", "--batch-size", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = kvbench(*args, "--output", str(tmp_path / "single"), env=environment)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29517", "-m", "kvbench", *args, "--output", str(tmp_path / "parallel")],
                            capture_output=True, text=True, env=environment)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "over 2 processes" in launch.stdout
    timing = ("prefill_seconds", "decode_seconds", "peak_memory_mb")
    for folder in ("snapkv-32", "h2o-32"):
        for task in ("trec", "lcc"):
            rows = {}
            for kind in ("single", "parallel"):
                lines = (tmp_path / kind / "tiny-model" / folder / f"{task}.jsonl").read_text().splitlines()
                parsed = [json.loads(line) for line in lines]
                rows[kind] = {row["_id"]: {k: v for k, v in row.items() if k not in timing} for row in parsed}
                assert len(rows[kind]) == len(parsed) == 5  # each sample exactly once
            assert rows["parallel"] == rows["single"]
        scores = [json.loads((tmp_path / kind / "tiny-model" / folder / "scores.json").read_text())
                  for kind in ("single", "parallel")]
        assert scores[0] == scores[1]


@pytest.mark.parametrize("line, message", [
    ('{"_id": ["a"], "context": "c", "input": "i", "answers": ["x"], "length": 1}', "_id must be a string"),
    ('{"_id": {"a": 1}, "context": "c", "input": "i", "answers": ["x"], "length": 1}', "_id must be a string"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_odd_data_rows_are_one_line_before_the_model_loads(tmp_path, line, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "trec.jsonl").write_text(line + "\n", encoding="utf-8")
    for command in (["run", "--method", "fullkv", "--tasks", "trec", "--data-dir", str(data), "--output",
                     str(tmp_path / "out")],
                    ["train-classifier", "--data-dir", str(data), "--tasks", "trec"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
