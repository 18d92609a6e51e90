"""`kvbench report` on hand-made run folders: the numbers in the tables, the marks, the files."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.results import load_runs, write_report
from kvbench.results.tables import leaderboard, longbench_e_table, needle_table, to_markdown
from kvbench.tasks.needle import DEFAULT_ANSWER

MODEL = "tiny-model"
RIGHT_ANSWER = "Eat a sandwich and sit in Dolores Park on a sunny day."


def write_run(root: Path, method: str, capacity: int | None, planned: dict[str, int],
              rows: dict[str, list[dict]], scores: dict | None = None, settings: dict | None = None,
              folder: str | None = None) -> Path:
    """A run folder as `kvbench run` writes it: run.json, <task>.jsonl, and scores.json when finished."""
    run_dir = root / MODEL / (folder or (method if capacity is None else f"{method}-{capacity}"))
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "model": MODEL, "method": method, "capacity": capacity,
        "settings": {"capacity": capacity, **(settings or {})}, "tasks": planned, "max_length": 8000,
    }))
    for task, task_rows in rows.items():
        with open(run_dir / f"{task}.jsonl", "w") as handle:
            for row in task_rows:
                handle.write(json.dumps(row) + "\n")
    if scores is not None:
        (run_dir / "scores.json").write_text(json.dumps(scores))
    return run_dir


def qa_rows(right: int, wrong: int, lengths: list[int] | None = None) -> list[dict]:
    """QA rows whose F1 is 1 (right) or 0 (wrong), so a task's score is 100 * right / (right + wrong)."""
    rows = [{"pred": "Paris", "answers": ["Paris"]} for _ in range(right)]
    rows += [{"pred": "London", "answers": ["Paris"]} for _ in range(wrong)]
    return [{"_id": f"s{number}", "all_classes": None, "length": (lengths or [1000] * len(rows))[number], **row}
            for number, row in enumerate(rows)]


def needle_rows(cells: dict[tuple[int, int], str]) -> list[dict]:
    return [{"_id": f"len{length}-depth{depth}", "pred": pred, "answers": [DEFAULT_ANSWER], "all_classes": None,
             "length": length, "context_length": length, "depth_percent": depth}
            for (length, depth), pred in cells.items()]


@pytest.fixture
def results(tmp_path) -> Path:
    """Three LongBench runs (one unfinished), a needle run in progress, a finished LongBench-E run.

    Scores of finished tasks come from scores.json and differ from what their rows would give,
    so the tests can tell which source was read.
    """
    root = tmp_path / "results"
    planned = {"qasper": 2, "narrativeqa": 2, "hotpotqa": 4}
    write_run(root, "fullkv", None, planned,
              {"qasper": qa_rows(2, 0), "narrativeqa": qa_rows(2, 0), "hotpotqa": qa_rows(4, 0)},
              {"qasper": {"score": 60.0, "n": 2}, "narrativeqa": {"score": 20.0, "n": 2},
               "hotpotqa": {"score": 40.0, "n": 4}})
    # Unfinished: hotpotqa has 2 of 4 rows, one right; no scores.json yet.
    write_run(root, "snapkv", 128, planned,
              {"qasper": qa_rows(2, 0), "narrativeqa": qa_rows(2, 0), "hotpotqa": qa_rows(1, 1)},
              {"qasper": {"score": 50.0, "n": 2}, "narrativeqa": {"score": 30.0, "n": 2}})
    write_run(root, "snapkv", 256, planned,
              {"qasper": qa_rows(2, 0), "narrativeqa": qa_rows(2, 0), "hotpotqa": qa_rows(4, 0)},
              {"qasper": {"score": 55.0, "n": 2}, "narrativeqa": {"score": 35.0, "n": 2},
               "hotpotqa": {"score": 45.0, "n": 4}})
    # Needle 2 lengths x 2 depths, 3 of 4 cells done: recall 100, 25, 0.
    write_run(root, "snapkv", 128, {"needle": 4},
              {"needle": needle_rows({(1000, 0): RIGHT_ANSWER, (1000, 100): "sit in the park",
                                      (2000, 0): "I don't know"})}, folder="snapkv-128-needle")
    # LongBench-E, finished, scored from its rows: qasper_e right at 0-4k, wrong at 8k+.
    write_run(root, "snapkv", 256, {"qasper_e": 2},
              {"qasper_e": qa_rows(1, 1, lengths=[1000, 9000])}, folder="snapkv-256-e")
    return root


def find(frame: pd.DataFrame, method: str, capacity, task: str) -> pd.Series:
    match = frame[(frame["method"] == method) & (frame["task"] == task)
                  & (frame["capacity"].isna() if capacity is None else frame["capacity"] == capacity)]
    assert len(match) == 1
    return match.iloc[0]


def test_load_runs_reads_every_run(results):
    frame = load_runs(results)
    assert len(frame) == 3 * 3 + 1 + 1
    finished = find(frame, "fullkv", None, "qasper")
    assert (finished["score"], finished["score_source"], finished["complete"]) == (60.0, "scores.json", True)
    assert finished["category"] == "single-doc QA"
    partial = find(frame, "snapkv", 128, "hotpotqa")
    assert (partial["n_done"], partial["n_total"], partial["complete"]) == (2, 4, False)
    assert (partial["score"], partial["score_source"]) == (50.0, "rows")
    needle = find(frame, "snapkv", 128, "needle")
    assert needle["category"] == "needle"
    assert needle["score"] == pytest.approx((100 + 25 + 0) / 3)
    assert needle["phrase_found"] == pytest.approx(100 / 3)
    e_row = find(frame, "snapkv", 256, "qasper_e")
    assert (e_row["0-4k"], e_row["8k+"], e_row["score"]) == (100.0, 0.0, 50.0)
    assert math.isnan(e_row["4-8k"])
    # One folder of a run, or a parent of several, are both fine.
    assert len(load_runs(results / MODEL / "snapkv-128")) == 3


def cell_texts(table) -> dict[tuple, dict[str, str]]:
    """{(method, capacity): {column: shown text, bold as **...**}}"""
    texts = {}
    for position, row in enumerate(table.cells):
        run = table.runs.iloc[position]
        capacity = None if pd.isna(run["capacity"]) else int(run["capacity"])
        texts[(run["method"], capacity)] = {
            column: f"**{cell.text}**" if cell.best else cell.text for column, cell in zip(table.columns, row)}
    return texts


def test_leaderboard_numbers_marks_and_flags(results):
    table = leaderboard(load_runs(results))
    # LongBench's order: single-doc QA (narrativeqa, qasper), then multi-doc QA.
    assert table.columns == ["narrativeqa", "qasper", "single-doc QA avg", "hotpotqa", "multi-doc QA avg",
                             "Avg", "Task avg"]
    assert [tuple(run) for run in table.runs[["method"]].itertuples(index=False)] == [
        ("fullkv",), ("snapkv",), ("snapkv",)]
    texts = cell_texts(table)
    assert texts[("fullkv", None)] == {
        "narrativeqa": "20.00", "qasper": "**60.00**", "single-doc QA avg": "40.00",
        "hotpotqa": "40.00", "multi-doc QA avg": "40.00", "Avg": "40.00", "Task avg": "40.00"}
    # The unfinished hotpotqa shows its progress; averages over it are flagged and never bold,
    # though 50.00 and 45.00* beat every finished value of their columns.
    assert texts[("snapkv", 128)] == {
        "narrativeqa": "30.00", "qasper": "50.00", "single-doc QA avg": "40.00",
        "hotpotqa": "50.00 (2/4)", "multi-doc QA avg": "50.00*", "Avg": "45.00*", "Task avg": "43.33*"}
    assert texts[("snapkv", 256)] == {
        "narrativeqa": "**35.00**", "qasper": "55.00", "single-doc QA avg": "**45.00**",
        "hotpotqa": "**45.00**", "multi-doc QA avg": "**45.00**", "Avg": "**45.00**", "Task avg": "**45.00**"}
    markdown = to_markdown(table)
    assert "| tiny-model | snapkv | 128 | 30.00 | 50.00 | 40.00 | 50.00 (2/4) | 50.00* | 45.00* | 43.33* |" in markdown
    assert "| tiny-model | fullkv | – | 20.00 | **60.00** |" in markdown


def test_needle_and_longbench_e_tables(results):
    frame = load_runs(results)
    needle = cell_texts(needle_table(frame))
    assert needle == {("snapkv", 128): {"Needle score (ROUGE-1 recall)": "41.67 (3/4)",
                                        "ROUGE-1 F1": "45.83 (3/4)", "Answer found (%)": "33.33 (3/4)"}}
    e_table = longbench_e_table(frame)
    assert e_table.columns == ["0-4k", "4-8k", "8k+", "All"]
    assert cell_texts(e_table) == {("snapkv", 256): {"0-4k": "100.00", "4-8k": "–", "8k+": "0.00", "All": "50.00"}}


def test_settings_tell_variants_apart_and_true_duplicates_are_refused(tmp_path):
    planned, rows = {"qasper": 1}, {"qasper": qa_rows(1, 0)}
    write_run(tmp_path, "pyramidkv", 128, planned, rows, settings={"window_size": 8, "beta": 20})
    write_run(tmp_path, "pyramidkv", 128, planned, rows, settings={"window_size": 32, "beta": 20}, folder="w32")
    frame = load_runs(tmp_path)
    assert sorted(frame["settings"]) == ["window_size=32", "window_size=8"]
    write_run(tmp_path, "pyramidkv", 128, planned, rows, settings={"window_size": 8, "beta": 20}, folder="again")
    with pytest.raises(KvbenchError, match="more than one run folder"):
        load_runs(tmp_path)


def test_a_row_being_written_is_skipped(tmp_path):
    run_dir = write_run(tmp_path, "snapkv", 64, {"qasper": 3}, {"qasper": qa_rows(2, 0)})
    with open(run_dir / "qasper.jsonl", "a") as handle:
        handle.write('{"_id": "s2", "pred": "Par')
    row = load_runs(tmp_path).iloc[0]
    assert (row["n_done"], row["complete"], row["score"]) == (2, False, 100.0)


class _PageParts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"


def test_report_files(results, tmp_path):
    out = tmp_path / "report"
    written = write_report([results], out)
    names = {path.name for path in written}
    assert {"report.md", "report.html", "runs.csv", "longbench.csv", "longbench_e.csv", "needle.csv",
            "needle_cells.csv", "needle-tiny-model-snapkv-128.png", "capacity-tiny-model.png"} <= names

    for png in out.glob("*.png"):
        picture = matplotlib.image.imread(png)
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 300

    page = _PageParts()
    page.feed((out / "report.html").read_text())
    assert page.tables == 4  # LongBench, LongBench-E, needle, runs
    assert len(page.images) == 2
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    markdown = (out / "report.md").read_text()
    assert "## LongBench" in markdown and "![" in markdown and "(needle-tiny-model-snapkv-128.png)" in markdown
    leaderboard_csv = pd.read_csv(out / "longbench.csv")
    assert list(leaderboard_csv["Avg"].round(2)) == [40.0, 45.0, 45.0]
    assert list(leaderboard_csv["Avg complete"]) == [True, False, True]


def test_report_writes_only_the_formats_asked_for(results, tmp_path):
    written = write_report([results], tmp_path / "csv-only", ["csv"])
    assert all(path.suffix == ".csv" for path in written)


def test_report_default_folder_is_inside_the_first_run_folder(results):
    write_report([results / MODEL / "snapkv-128-needle"], formats=["md"])
    assert (results / MODEL / "snapkv-128-needle" / "report" / "report.md").is_file()


def test_cli_report(results, tmp_path):
    result = CliRunner().invoke(main, ["report", str(results), "--out", str(tmp_path / "r"), "--format", "md,html"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "r" / "report.html") in result.output


@pytest.mark.parametrize("make_input, message", [
    (lambda root: root / "absent", "no such run folder"),
    (lambda root: root, "no run in"),
    (lambda root: write_run(root, "snapkv", 64, {"qasper": 3}, {}), "no finished sample yet"),
])
def test_cli_report_bad_input_is_one_line_and_exit_2(tmp_path, make_input, message):
    folder = make_input(tmp_path)
    result = CliRunner().invoke(main, ["report", str(folder)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output


def test_cli_report_bad_format(results):
    result = CliRunner().invoke(main, ["report", str(results), "--format", "pdf"])
    assert result.exit_code == 2 and "--format" in result.output
