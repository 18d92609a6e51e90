"""Scoring prediction files: `evaluate_path`, `score_rows` and the `kvbench eval` command."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.tasks.evaluate import evaluate_path, score_rows
from kvbench.tasks.longbench_spec import LONGBENCH_TASKS, TASK_TABLE
from tests.torch_free import assert_runs_without_torch

CLASSES = ["Date", "Individual", "Description of a person"]


def write_predictions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def prediction(pred: str, answers: list[str], length: int = 100, all_classes=None) -> dict:
    return {"pred": pred, "answers": answers, "all_classes": all_classes, "length": length}


@pytest.fixture
def gold_predictions(longbench_mini, tmp_path) -> Path:
    """LongBench pred files for the mini samples, each predicting its first gold answer."""
    folder = tmp_path / "gold"
    folder.mkdir()
    for data_file in sorted(longbench_mini.glob("*.jsonl")):
        samples = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
        rows = [prediction(s["answers"][0], s["answers"], s["length"], s["all_classes"]) for s in samples]
        write_predictions(folder / data_file.name, rows)
    return folder


def test_gold_answers_score_100_on_every_task(gold_predictions):
    # The official eval.py gives 100.0 to all 21 of these files too (checked side by side).
    # Gold is not 100 everywhere by construction: a gold code line holding "#" or "//" would be
    # skipped by code_sim_score, and a gold summary of ~990+ words in one sentence overflows
    # rouge; none of the mini samples does either.
    table = evaluate_path(gold_predictions)
    assert list(table["task"]) == LONGBENCH_TASKS
    assert list(table["category"]) == [TASK_TABLE[name].category for name in LONGBENCH_TASKS]
    assert table["n"].sum() == 237
    assert dict(zip(table["task"], table["score"])) == {name: 100.0 for name in LONGBENCH_TASKS}


def test_scores_are_the_mean_times_100_rounded_to_two_places():
    rows = [prediction("Paris", ["Paris"]), prediction("Rome", ["Paris"]), prediction("no", ["Paris"])]
    assert score_rows("hotpotqa", rows) == {"score": 33.33}
    partial = [prediction("Barack Obama", ["Barack Hussein Obama"]), prediction("x", ["y"])]
    assert score_rows("hotpotqa", partial) == {"score": 40.0}  # (0.8 + 0) / 2


def test_longbench_e_scores_each_length_bucket(tmp_path):
    rows = [
        prediction("Paragraph 1", ["Paragraph 1"], length=3999),
        prediction("Paragraph 2", ["Paragraph 1"], length=4000),
        prediction("Paragraph 1 or 2", ["Paragraph 1"], length=7999),
        prediction("Paragraph 1", ["Paragraph 1"], length=12000),
    ]
    write_predictions(tmp_path / "passage_retrieval_en_e.jsonl", rows)
    table = evaluate_path(tmp_path, longbench_e=True)
    record = table.iloc[0].to_dict()
    low, high = record.pop("score_low"), record.pop("score_high")
    assert record == {"task": "passage_retrieval_en_e", "category": "synthetic", "n": 4, "score": 62.5,
                      "0-4k": 100.0, "4-8k": 25.0, "8k+": 100.0}
    # the samples score 100, 0, 50, 100: no resample's mean leaves [0, 100], the 95% interval holds the mean
    assert 0 <= low < 62.5 < high <= 100


def test_an_empty_bucket_has_no_score():
    scores = score_rows("qasper", [prediction("yes", ["yes"], length=500)], longbench_e=True)
    assert scores == {"score": 100.0, "0-4k": 100.0, "4-8k": None, "8k+": None}


def test_classification_uses_the_class_list_of_the_last_line_as_official_eval_does(tmp_path):
    rows = [
        prediction("Individual", ["Individual"], all_classes=["Date"]),
        prediction("Date", ["Date"], all_classes=CLASSES),
    ]
    write_predictions(tmp_path / "trec.jsonl", rows)
    assert evaluate_path(tmp_path)["score"].tolist() == [100.0]
    # last line's list is ["Date"]: the correct "Individual" finds no class and scores 0
    write_predictions(tmp_path / "trec.jsonl", rows[::-1])
    assert evaluate_path(tmp_path)["score"].tolist() == [50.0]


def test_a_run_folder_scores_its_longbench_files_and_reports_the_rest(tmp_path):
    write_predictions(tmp_path / "triviaqa.jsonl", [prediction("\nParis\nbecause", ["Paris"])])
    write_predictions(tmp_path / "needle.jsonl", [prediction("x", ["x"])])
    write_predictions(tmp_path / "qasper.old.jsonl", [prediction("x", ["x"])])
    (tmp_path / "scores.json").write_text("{}")
    (tmp_path / "run.json").write_text("{}")
    table = evaluate_path(tmp_path)
    assert table[["task", "n", "score"]].values.tolist() == [["triviaqa", 1, 100.0]]
    assert table.attrs["skipped"] == ["needle.jsonl: not a LongBench task", "qasper.old.jsonl: not a LongBench task"]


def test_a_single_file_is_scored_by_its_stem(tmp_path):
    path = write_predictions(tmp_path / "multifieldqa_zh.jsonl", [prediction("北京是中国的首都。", ["中国的首都"])])
    assert evaluate_path(path)["score"].tolist() == [75.0]
    other = write_predictions(tmp_path / "needle.jsonl", [prediction("x", ["x"])])
    with pytest.raises(KvbenchError, match="'needle' is not a LongBench task"):
        evaluate_path(other)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"pred": "a", "answers": ["a"]}\n{"pred": "a", "answers": ["a"]\n', r"qasper.jsonl:2: not valid JSON"),
        (b'{"pred": "a", "answers": ["a"]}\n\n{"answers": ["a"]}\n', r"qasper.jsonl:3: no 'pred' field"),
        (b'{"pred": "a"}\n', r"qasper.jsonl:1: no 'answers' field"),
        (b'{"pred": "a", "answers": "a"}\n', r"qasper.jsonl:1: 'answers' must be a list of strings"),
        (b'{"pred": null, "answers": ["a"]}\n', r"qasper.jsonl:1: 'pred' is NoneType"),
        (b'{"pred": "a", "answers": ["a"]}\n{"pred": "caf\xe9", "answers": ["a"]}\n', r"qasper.jsonl:2: not UTF-8 text"),
        (b'["a"]\n', r"qasper.jsonl:1: expected a JSON object"),
        (b"\n", r"qasper.jsonl: no predictions"),
    ],
)
def test_bad_prediction_files_are_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "qasper.jsonl").write_bytes(content)
    with pytest.raises(KvbenchError, match=message):
        evaluate_path(tmp_path)


def test_other_bad_inputs_are_explained(tmp_path):
    with pytest.raises(KvbenchError, match="no such file or folder"):
        evaluate_path(tmp_path / "missing")
    with pytest.raises(KvbenchError, match="no LongBench prediction files"):
        evaluate_path(tmp_path)
    write_predictions(tmp_path / "qasper.jsonl", [{"pred": "a", "answers": ["a"]}])
    with pytest.raises(KvbenchError, match=r"qasper.jsonl:1: LongBench-E scoring needs an integer 'length'"):
        evaluate_path(tmp_path, longbench_e=True)
    write_predictions(tmp_path / "qasper.jsonl", [prediction("a", ["a"])])
    write_predictions(tmp_path / "lsht.jsonl", [prediction("体育", ["体育"])])
    with pytest.raises(KvbenchError, match=r"lsht.jsonl:1: lsht is scored against its class names"):
        evaluate_path(tmp_path)
    write_predictions(tmp_path / "lsht.jsonl", [prediction("体育", ["体育"], all_classes=["体育"])])
    write_predictions(tmp_path / "passage_retrieval_zh.jsonl", [prediction("段落1", ["段落1"]), prediction("1", ["第一段"])])
    with pytest.raises(KvbenchError, match=r"passage_retrieval_zh.jsonl:2: gold answer '第一段' names no paragraph"):
        evaluate_path(tmp_path)


# --- the command -----------------------------------------------------------------------------


def test_eval_command_prints_the_table_and_writes_json(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_predictions(folder / "trec.jsonl", [prediction("Date", ["Date"], all_classes=CLASSES),
                                              prediction("Individual", ["Date"], all_classes=CLASSES)])
    write_predictions(folder / "lcc.jsonl", [prediction("x = 1", ["x = 1"])])
    write_predictions(folder / "needle.jsonl", [prediction("x", ["x"])])
    json_file = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", str(folder), "--json", str(json_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "task     category  n   score  95% interval",
        "trec     few-shot  2   50.00  0.00..100.00",
        "lcc      code      1  100.00             -",
        "average                75.00             -",
        "(lcc and repobench-p scored with fuzzywuzzy's ratio on the levenshtein matcher)",
    ]
    assert result.stderr == "note: skipped needle.jsonl: not a LongBench task\n"
    assert json.loads(json_file.read_text()) == {"trec": 50.0, "lcc": 100.0}


def test_eval_command_with_longbench_e_writes_bucket_scores(tmp_path):
    write_predictions(tmp_path / "samsum_e.jsonl", [prediction("Amy is late.", ["Amy is late."], length=5000)])
    json_file = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--longbench-e", "--json", str(json_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == ["samsum_e", "few-shot", "1", "100.00", "-", "-", "100.00", "-"]
    assert json.loads(json_file.read_text()) == {"samsum_e": {"score": 100.0, "0-4k": None, "4-8k": 100.0, "8k+": None}}


def test_eval_command_reports_bad_input_in_one_line_with_exit_2(tmp_path):
    (tmp_path / "qasper.jsonl").write_bytes(b'{"pred": "a", "answers": ["a"]}\n{"pred": \n')
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'qasper.jsonl'}:2: not valid JSON (Expecting value at character 11)\n"
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["eval", str(tmp_path / "nothing")])
    assert (missing.exit_code, missing.stderr) == (2, f"error: {tmp_path / 'nothing'}: no such file or folder\n")


@pytest.mark.parametrize("bad_line", ['{"_id": ["a"], "pred": "x", "answers": ["x"]}', "[" * 100000 + "]" * 100000])
def test_odd_ids_and_deep_nesting_are_one_line(tmp_path, bad_line):
    run, reference = tmp_path / "run", tmp_path / "reference"
    for folder in (run, reference):
        folder.mkdir()
        (folder / "qasper.jsonl").write_text(bad_line + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", str(run), "--against-run", str(reference)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_imports_no_torch(tmp_path):
    write_predictions(tmp_path / "qasper.jsonl", [prediction("yes", ["yes"])])
    assert_runs_without_torch(["eval", str(tmp_path)])
