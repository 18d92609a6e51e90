"""`kvbench report` on hand-made run folders: the numbers in the tables, the marks, the files."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pandas as pd
from matplotlib.figure import Figure
import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.report import load_runs, write_report
from kvbench.report import plots
from kvbench.report.tables import (
    PAPER_TASKS,
    leaderboard,
    longbench_e_table,
    needle_table,
    paper_table,
    runs_table,
    to_html,
    to_markdown,
)
from kvbench.tasks.needle import DEFAULT_ANSWER
from tests.torch_free import assert_runs_without_torch

MODEL = "tiny-model"
RIGHT_ANSWER = "Eat a sandwich and sit in Dolores Park on a sunny day."


def write_run(root: Path, method: str, capacity: int | None, planned: dict[str, int],
              rows: dict[str, list[dict]], scores: dict | None = None, settings: dict | None = None,
              folder: str | None = None, method_files: dict | None = None, max_length: int | None = 8000,
              model: str = MODEL, code_sim_matcher: str | None = "difflib", batch_invariant: bool = False) -> Path:
    """A run folder as `kvbench run` writes it: run.json, <task>.jsonl, and scores.json when finished
    (``code_sim_matcher`` None: a run.json from before the matcher was recorded)."""
    run_dir = root / model / (folder or (method if capacity is None else f"{method}-{capacity}"))
    run_dir.mkdir(parents=True)
    options = {"capacity": capacity, **(settings or {})}
    (run_dir / "run.json").write_text(json.dumps({
        "model": model, "method": method, "capacity": capacity, "settings": options, "max_length": max_length,
        "dtype": "bfloat16", "attention": "sdpa", "device": "cuda", "data_dir": None, "tasks": planned,
        "task_settings": {},
        "identity": {"format": 1, "model": {"name": model}, "dtype": "bfloat16", "attention": "sdpa",
                     "max_length": max_length, "method": method, "options": options,
                     "method_files": method_files or {},
                     **({} if code_sim_matcher is None else {"scorer": {"code_sim_matcher": code_sim_matcher}}),
                     **({"batch_invariant": True} if batch_invariant else {})},
        "task_identity": {},
    }))
    for task, task_rows in rows.items():
        with open(run_dir / f"{task}.jsonl", "w") as handle:
            for row in task_rows:
                handle.write(json.dumps(row) + "\n")
    if scores is not None:
        (run_dir / "scores.json").write_text(json.dumps(scores))
    return run_dir


def finished_run(root: Path, method: str, capacity: int | None, scores: dict[str, float], **options) -> Path:
    """A finished run of one sample per task, its scores (read from scores.json) given."""
    return write_run(root, method, capacity, {task: 1 for task in scores}, {task: qa_rows(1, 0) for task in scores},
                     {task: {"score": score, "n": 1} for task, score in scores.items()}, **options)


def measured(rows: list[dict], kept_tokens: list[float], kv_cache_mb: list[float]) -> list[dict]:
    """``rows`` with each one's mean kept tokens per layer and KV cache MiB, as the run loop records them."""
    return [{**row, "kept_tokens": {"mean": kept, "min": int(kept), "max": int(kept) + 1}, "kv_cache_mb": mib}
            for row, kept, mib in zip(rows, kept_tokens, kv_cache_mb)]


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
    assert {"report.md", "paper.md", "report.html", "runs.csv", "longbench.csv", "paper.csv", "longbench_e.csv",
            "needle.csv", "needle_cells.csv", "needle-tiny-model-snapkv-128.png", "capacity-tiny-model.png"} <= names

    for png in out.glob("*.png"):
        picture = matplotlib.image.imread(png)
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 300

    page = _PageParts()
    page.feed((out / "report.html").read_text())
    assert page.tables == 6  # LongBench, the papers' layout, LongBench-E, needle, difference from FullKV, runs
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
    (lambda root: _with_bytes(write_run(root, "snapkv", 64, {"qasper": 1}, {"qasper": qa_rows(1, 0)}) / "run.json",
                              b'{"model": "m\xff"}'), "run.json: not UTF-8"),
    (lambda root: _with_bytes(write_run(root, "snapkv", 64, {"qasper": 1}, {}) / "qasper.jsonl",
                              b'{"_id": "s0", "pred": "Par\xe9", "answers": ["Paris"]}\n'), "qasper.jsonl:1: not UTF-8"),
    (lambda root: write_run(root, "snapkv", "64", {"qasper": 1}, {"qasper": qa_rows(1, 0)}),
     "capacity must be a whole number or null, got '64'"),
    (lambda root: write_run(root, "snapkv", 64, {"needle": 1},
                            {"needle": [{"_id": "a", "pred": "x", "answers": ["y"]}]}),
     "needle.jsonl: row 'a' has no numeric context_length"),
])
def test_cli_report_bad_input_is_one_line_and_exit_2(tmp_path, make_input, message):
    folder = make_input(tmp_path)
    result = CliRunner().invoke(main, ["report", str(folder)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output


def _with_bytes(path: Path, data: bytes) -> Path:
    """Overwrite ``path`` with ``data``; the run folder holding it."""
    path.write_bytes(data)
    return path.parent


@pytest.mark.parametrize("make_out, message", [
    (lambda root: _file(root / "taken"), "is a file"),
    (lambda root: _file(root / "taken") / "report", "lies under the file"),
])
def test_cli_report_refuses_an_out_folder_it_cannot_make_before_reading_runs(tmp_path, make_out, message):
    out = make_out(tmp_path)
    for runs in (tmp_path / "absent", tmp_path):  # checked first: the missing runs are not what it says
        result = CliRunner().invoke(main, ["report", str(runs), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and message in result.output and "--out" in result.output
    with pytest.raises(KvbenchError, match=message):
        write_report([tmp_path / "absent"], out)


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def test_cli_report_bad_format(results):
    result = CliRunner().invoke(main, ["report", str(results), "--format", "pdf"])
    assert result.exit_code == 2 and "--format" in result.output


# -- the papers' layout ---------------------------------------------------------------------------------


def test_paper_table_blocks_methods_tasks_and_marks(tmp_path):
    """Blocks FullKV first then by capacity, the papers' method order, their abbreviations, Chinese left out."""
    tasks = {"narrativeqa": 10.0, "lcc": 50.0, "multifieldqa_zh": 70.0}
    finished_run(tmp_path, "fullkv", None, tasks)
    for position, method in enumerate(["elastic", "windowkv", "snapkv", "h2o", "prefixkv", "streamingllm",
                                       "pyramidkv", "custom"]):
        finished_run(tmp_path, method, 512, {"narrativeqa": 20.0 + position, "lcc": 40.0 - position})
    finished_run(tmp_path, "snapkv", 128, {"narrativeqa": 15.0, "lcc": 30.0})
    finished_run(tmp_path, "snapkv", 64, {"narrativeqa": 14.0})
    table = paper_table(load_runs(tmp_path))

    assert table.columns == ["NrtvQA", "Lcc", "Avg."]
    assert table.groups == [("Single-Doc QA", 1), ("Code", 1), ("", 1)]
    assert [label for _, label in table.blocks] == [
        f"{MODEL}, Max Input Length = 8000, KV Size = {size}" for size in ("Full", "64", "128", "512")]
    assert [position for position, _ in table.blocks] == [0, 1, 2, 3]
    assert table.row_labels == ["FullKV", "SnapKV", "SnapKV", "StreamingLLM", "H2O", "SnapKV", "PyramidKV",
                                "WindowKV", "PrefixKV", "Elastic Cache", "custom"]
    texts = [[f"**{cell.text}**" if cell.best else cell.text for cell in row] for row in table.cells]
    # Avg. is over the papers' 16 tasks: with 14 not run it is partial, never ranked.
    assert texts[0] == ["10.00", "50.00", "30.00*"]
    assert texts[1] == ["14.00", "–", "14.00*"]
    # Bold marks the best of a column within a block (the 512 block: custom's 27, elastic's 40).
    assert texts[4] == ["23.00", "37.00", "30.00*"]
    assert texts[7] == ["21.00", "39.00", "30.00*"]
    assert texts[9] == ["20.00", "**40.00**", "30.00*"]
    assert texts[10] == ["**27.00**", "33.00", "30.00*"]
    assert any("multifieldqa_zh" in note and "left out" in note for note in table.notes)

    markdown = to_markdown(table)
    assert "| Method | NrtvQA | Lcc | Avg. |" in markdown
    assert f"| **{MODEL}, Max Input Length = 8000, KV Size = 512** |  |  |  |" in markdown
    assert "| Elastic Cache | 20.00 | **40.00** | 30.00* |" in markdown
    page = to_html(table)
    assert f'<tr class="block"><th colspan="4">{MODEL}, Max Input Length = 8000, KV Size = Full</th></tr>' in page
    assert '<th colspan="1" class="group">Single-Doc QA</th>' in page


def test_paper_table_average_is_the_mean_of_the_16_tasks(tmp_path):
    finished_run(tmp_path, "snapkv", 128, {task: float(position) for position, task in enumerate(PAPER_TASKS)})
    finished_run(tmp_path, "pyramidkv", 128, {task: 1.0 for task in PAPER_TASKS})
    table = paper_table(load_runs(tmp_path))
    assert table.columns == ["NrtvQA", "Qasper", "MF-en", "HotpotQA", "2WikiMQA", "Musique", "GovReport", "QMSum",
                             "MultiNews", "TREC", "TriviaQA", "SAMSum", "PCount", "PRe", "Lcc", "RB-P", "Avg."]
    assert [label for label, _ in table.groups] == ["Single-Doc QA", "Multi-Doc QA", "Summarization",
                                                    "Few-shot Learning", "Synthetic", "Code", ""]
    snapkv = table.cells[table.row_labels.index("SnapKV")]
    assert (snapkv[-1].text, snapkv[-1].complete, snapkv[-1].best) == ("7.50", True, True)


def test_report_writes_the_papers_layout_in_every_format(results, tmp_path):
    out = tmp_path / "report"
    write_report([results], out)
    assert "## LongBench, as in the papers" in (out / "report.md").read_text()
    assert (out / "paper.md").read_text().startswith("## LongBench, as in the papers\n\n| Method | NrtvQA | Qasper |")
    assert "LongBench, as in the papers</h2>" in (out / "report.html").read_text()
    paper = pd.read_csv(out / "paper.csv", dtype={"capacity": "Int64"})
    assert list(paper["method"]) == ["fullkv", "snapkv", "snapkv"]
    assert list(paper["capacity"].astype("string").fillna("")) == ["", "128", "256"]


# -- what a run keeps, how it was run -----------------------------------------------------------------------


def test_leaderboard_shows_what_each_run_keeps(tmp_path):
    """One --capacity, unequal budgets: the mean kept tokens and KV MiB over the run's rows are shown."""
    write_run(tmp_path, "snapkv", 512, {"qasper": 2}, {"qasper": measured(qa_rows(2, 0), [512, 512], [30, 30])})
    # Weighted by rows: (1 * 500 + 3 * 552) / 4 = 539.
    write_run(tmp_path, "windowkv", 512, {"qasper": 1, "hotpotqa": 3},
              {"qasper": measured(qa_rows(1, 0), [500], [29.0]),
               "hotpotqa": measured(qa_rows(3, 0), [552, 552, 552], [32.0, 32.0, 32.0])})
    table = leaderboard(load_runs(tmp_path))
    markdown = to_markdown(table)
    assert "| Model | Method | Capacity | Kept tok. | KV MiB | qasper |" in markdown
    assert "| tiny-model | snapkv | 512 | 512.0 | 30.0 | **100.00** |" in markdown
    assert "| tiny-model | windowkv | 512 | 539.0 | 31.2 | **100.00** |" in markdown
    assert any(note.startswith("Kept tok.") for note in table.notes)
    numbers = table.numbers()
    assert list(numbers["kept_tokens"]) == [512.0, 539.0]


def test_runs_without_measurements_show_no_such_columns(results):
    markdown = to_markdown(leaderboard(load_runs(results)))
    assert "Kept tok." not in markdown and "KV MiB" not in markdown


def test_runs_table_shows_max_length_dtype_method_files_and_decoding(tmp_path):
    rows = {"qasper": qa_rows(1, 0)}
    write_run(tmp_path, "windowkv", 512, {"qasper": 1}, rows, method_files={"classifier": "ab12" * 16})
    write_run(tmp_path, "prefixkv", None, {"qasper": 1}, rows, max_length=None,
              method_files={"prefixkv_profiles": {"prefixkv_tiny_0.9.json": "cd34" * 16}})
    write_run(tmp_path, "snapkv", 512, {"qasper": 1}, rows, max_length=4096, batch_invariant=True)
    table = runs_table(load_runs(tmp_path))
    assert table.columns[:4] == ["Max length", "Dtype", "Method files", "Decoding"]
    shown = {table.runs.iloc[position]["method"]: [cell.text for cell in row[:4]]
             for position, row in enumerate(table.cells)}
    assert shown == {
        "prefixkv": ["auto", "bfloat16", "prefixkv_profiles/prefixkv_tiny_0.9.json=cd34cd34cd34", "plain"],
        "snapkv": ["4096", "bfloat16", "–", "batch-invariant"],
        "windowkv": ["8000", "bfloat16", "classifier=ab12ab12ab12", "plain"],
    }


def test_unfinished_code_tasks_are_rescored_with_the_runs_own_matcher(tmp_path):
    """Rows of an unfinished lcc task are scored with the matcher its run recorded; a run from before the
    matcher was recorded was scored with difflib's. The pair's ratio is 26 under python-Levenshtein, 21 under
    difflib (see test_metrics)."""
    row = {"_id": "c0", "pred": ".beb)))=(", "answers": ["db)a((.a)ed.b aaa=,a(=d(a,d)),"], "all_classes": None,
           "length": 1000}
    for folder, matcher in (("levenshtein", "levenshtein"), ("difflib", "difflib"), ("unrecorded", None)):
        write_run(tmp_path, "snapkv", 64, {"lcc": 2}, {"lcc": [row]}, folder=folder, code_sim_matcher=matcher,
                  settings={"run": folder})
    frame = load_runs(tmp_path)
    scores = {Path(run_dir).name: score for run_dir, score in zip(frame["run_dir"], frame["score"])}
    assert scores == {"levenshtein": 26.0, "difflib": 21.0, "unrecorded": 21.0}


def test_samples_done_never_exceeds_planned(tmp_path):
    """A folder reused with a smaller --limit holds more rows than run.json plans."""
    write_run(tmp_path, "snapkv", 64, {"qasper": 2, "hotpotqa": 4},
              {"qasper": qa_rows(3, 0), "hotpotqa": qa_rows(1, 0)})
    table = runs_table(load_runs(tmp_path))
    assert table.cells[0][table.columns.index("Samples done")].text == "3/6"


# -- CSVs ---------------------------------------------------------------------------------------------------


def test_csvs_round_floats_and_write_whole_numbers_as_such(results, tmp_path):
    out = tmp_path / "report"
    write_report([results], out, ["csv"])
    for path in out.glob("*.csv"):
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in text.columns:
            for value in text[column]:
                if value.replace(".", "", 1).replace("-", "", 1).isdigit() and "." in value:
                    assert len(value.split(".")[1]) <= 2, (path.name, column, value)
        if "capacity" in text.columns:
            assert set(text["capacity"]) <= {"", "128", "256"}, path.name
            # Whole numbers read back as whole numbers; NA as an empty field.
            read_back = pd.read_csv(path, dtype={"capacity": "Int64"})["capacity"]
            assert read_back.isna().sum() == (text["capacity"] == "").sum()
    assert pd.read_csv(out / "longbench.csv")["Task avg"].tolist() == [40.0, 43.33, 45.0]
    runs = pd.read_csv(out / "runs.csv")
    assert runs["max_length"].dtype == "int64" and runs["n_done"].dtype == "int64"
    only_budgets = pd.read_csv(out / "needle_cells.csv")
    assert only_budgets["capacity"].dtype == "int64"


# -- pictures ------------------------------------------------------------------------------------------------


def test_heatmap_prints_each_cells_score(results, tmp_path, monkeypatch):
    drawn: list[tuple[str, str]] = []
    save = Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        drawn.extend((text.get_text(), text.get_color()) for axes in figure.axes for text in axes.texts)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    write_report([results / MODEL / "snapkv-128-needle"], tmp_path / "report", ["md"])
    # Three of the four cells are done (recall 100, 25, 0); the grey one has no number.
    assert sorted(text for text, _ in drawn) == ["0", "100", "25"]
    assert {color for _, color in drawn} == {plots.CELL_TEXT_COLOR}


def _capacity_points(monkeypatch) -> list[pd.DataFrame]:
    """The points handed to the capacity figure, recorded as the report draws it."""
    recorded: list[pd.DataFrame] = []
    draw = plots.capacity_figure

    def recording(points, title, path):
        recorded.append(points)
        return draw(points, title, path)

    monkeypatch.setattr(plots, "capacity_figure", recording)
    return recorded


def test_capacity_points_are_hollow_only_for_the_runs_own_unfinished_tasks(tmp_path, monkeypatch):
    recorded = _capacity_points(monkeypatch)
    # snapkv-64 ran only qasper (finished); snapkv-128 also narrativeqa and hotpotqa, hotpotqa unfinished.
    finished_run(tmp_path, "snapkv", 64, {"qasper": 40.0})
    write_run(tmp_path, "snapkv", 128, {"qasper": 1, "narrativeqa": 1, "hotpotqa": 4},
              {"qasper": qa_rows(1, 0), "narrativeqa": qa_rows(1, 0), "hotpotqa": qa_rows(1, 1)})
    write_report([tmp_path], tmp_path / "report", ["md"])
    (points,) = recorded
    complete = {(row.capacity, row.panel): row.complete for row in points.itertuples()}
    assert complete == {
        (64, "single-doc QA"): True,  # narrativeqa is another run's task, not an unfinished one of its own
        (64, "LongBench Avg"): True,
        (128, "single-doc QA"): True,
        (128, "multi-doc QA"): False,
        (128, "LongBench Avg"): False,
    }


def test_report_says_why_a_model_has_no_capacity_plot(tmp_path):
    finished_run(tmp_path, "fullkv", None, {"qasper": 40.0})
    finished_run(tmp_path, "snapkv", 128, {"qasper": 30.0})
    finished_run(tmp_path, "fullkv", None, {"qasper": 40.0}, model="other-model")
    out = tmp_path / "report"
    write_report([tmp_path], out, ["md", "html"])
    assert not list(out.glob("capacity-*.png"))
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Score versus capacity", 1)[1].split("## Runs", 1)[0]
    assert f"{MODEL}: no plot, since its runs have one KV capacity (128)" in section
    assert "other-model: no plot, since its runs have no KV capacity" in section
    assert f"{MODEL}: no plot, since its runs have one KV capacity (128)" in (out / "report.html").read_text()


def test_report_imports_no_torch(results, tmp_path):
    assert_runs_without_torch(["report", str(results), "--out", str(tmp_path / "r")])
