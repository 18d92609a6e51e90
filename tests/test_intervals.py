"""Bootstrap intervals and paired differences (`kvbench.intervals`), in the report's tables and in `kvbench eval`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.intervals import RESAMPLES, average_draws, bounds, paired_difference_draws, resampled_means
from kvbench.report import write_report
from kvbench.report.load import load_runs_and_samples
from kvbench.report.tables import leaderboard
from kvbench.report.uncertainty import paired_differences, task_draws
from tests.test_report import qa_rows, write_run


def test_intervals_hold_a_known_mean_in_at_least_90_percent_of_200_seeded_trials():
    """Samples of 100 * Beta(2, 5), whose mean is 100 * 2/7: a 95% percentile-bootstrap interval misses it
    somewhat more often than 5% of the time at n = 40, but far less often than 10%."""
    true_mean = 100 * 2 / 7
    covered = 0
    for trial in range(200):
        sample = 100 * np.random.default_rng(1000 + trial).beta(2, 5, size=40)
        low, high = bounds(resampled_means(sample, "synthetic", seed=trial))
        assert low < sample.mean() < high
        covered += low <= true_mean <= high
    assert covered >= 180


def test_a_runs_difference_from_itself_is_exactly_zero_with_a_zero_width_interval():
    scores = np.random.default_rng(0).uniform(0, 100, size=(3, 25))  # scores no float sum reproduces exactly
    draws = paired_difference_draws(scores, scores, "qasper/score")
    assert draws.shape == (3, RESAMPLES)
    assert np.all(draws == 0.0)
    assert bounds(draws[0]) == (0.0, 0.0)


def test_one_sample_has_no_interval():
    assert resampled_means(np.array([42.0]), "qasper/score") is None


def test_the_seed_makes_intervals_reproducible_and_another_seed_changes_them():
    sample = np.random.default_rng(1).uniform(0, 100, size=30)
    assert np.array_equal(resampled_means(sample, "trec/score", seed=3), resampled_means(sample, "trec/score", seed=3))
    assert not np.array_equal(resampled_means(sample, "trec/score", seed=3),
                              resampled_means(sample, "trec/score", seed=4))


def test_runs_of_one_task_share_their_resamples_so_their_draws_differ_as_their_paired_difference():
    """Stacking runs resamples the same samples for each: a run's draws minus another's are the paired draws."""
    scores = np.random.default_rng(2).uniform(0, 100, size=(2, 20))
    stacked = resampled_means(scores, "qasper/score")
    assert np.allclose(stacked[0] - stacked[1], paired_difference_draws(scores[0], scores[1], "qasper/score"))


def _two_task_runs(root: Path) -> None:
    """fullkv and snapkv on qasper (2 samples) and hotpotqa (40 samples, every one scoring 100)."""
    planned = {"qasper": 2, "hotpotqa": 40}
    write_run(root, "fullkv", None, planned, {"qasper": qa_rows(1, 1), "hotpotqa": qa_rows(40, 0)})
    write_run(root, "snapkv", 128, planned, {"qasper": qa_rows(1, 1), "hotpotqa": qa_rows(40, 0)})


def test_averages_resample_within_each_task_so_each_keeps_its_weight(tmp_path):
    """qasper's 2 samples score 100 and 0, hotpotqa's 40 all 100. Resampling within tasks, every average
    is (qasper's resampled mean + 100) / 2, so it lies in {50, 75, 100}; pooling the 42 samples would let
    qasper's weight drift with how many of its samples a resample draws."""
    _two_task_runs(tmp_path)
    frame, samples = load_runs_and_samples(tmp_path)
    draws = task_draws(samples, seed=0)
    table = leaderboard(frame, draws, seed=0)
    run = list(table.runs["method"]).index("fullkv")
    qasper = table.cells[run][table.columns.index("qasper")]
    task_average = table.cells[run][table.columns.index("Task avg")]
    assert np.array_equal(task_average.draws, (qasper.draws + 100) / 2)
    assert set(np.unique(task_average.draws)) <= {50.0, 75.0, 100.0}
    assert (task_average.low, task_average.high) == ((qasper.low + 100) / 2, (qasper.high + 100) / 2)
    assert np.array_equal(task_average.draws, average_draws([qasper.draws, np.full(RESAMPLES, 100.0)]))


def test_paired_differences_pick_the_full_cache_run_of_the_same_prompts(tmp_path):
    _two_task_runs(tmp_path)
    # other-model's snapkv saw prompts cut to another length than its fullkv: no reference
    write_run(tmp_path, "fullkv", None, {"qasper": 2}, {"qasper": qa_rows(0, 2)}, model="other-model", max_length=4000)
    write_run(tmp_path, "snapkv", 128, {"qasper": 2}, {"qasper": qa_rows(2, 0)}, model="other-model")
    frame, samples = load_runs_and_samples(tmp_path)
    differences, draws = paired_differences(frame, samples, seed=0)
    # Only tiny-model's snapkv has a reference: the same model's fullkv, not other-model's.
    assert sorted(differences["task"]) == ["hotpotqa", "qasper"]
    assert set(differences["reference_dir"]) == {str(tmp_path / "tiny-model" / "fullkv")}
    # Its rows equal the reference's sample for sample: every difference and every bound is exactly 0.
    assert list(differences["score"]) == [0.0, 0.0] and list(differences["n_done"]) == [2, 40]
    for row in differences.itertuples():
        assert bounds(draws[(row.run_dir, row.task, "score")]) == (0.0, 0.0)


def test_unfinished_tasks_stay_marked_with_their_interval(tmp_path):
    write_run(tmp_path, "fullkv", None, {"qasper": 4, "hotpotqa": 4},
              {"qasper": qa_rows(2, 1), "hotpotqa": qa_rows(3, 1)},
              {"hotpotqa": {"score": 75.0, "n": 4}})
    write_report([tmp_path], tmp_path / "report", ["md"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| tiny-model | fullkv"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert re.fullmatch(r"66\.67 ± \d+\.\d \(3/4\)", cells[3])  # qasper: 3 of 4 done
    assert re.fullmatch(r"75\.00 ± \d+\.\d", cells[6])  # hotpotqa: finished
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\*", cells[-1])  # Task avg over an unfinished task


def partly_right_rows(words_given: list[int]) -> list[dict]:
    """QA rows answering the first k of the answer's 8 words: F1 2k / (8 + k), one score per k."""
    answer = "a1 b2 c3 d4 e5 f6 g7 h8"
    return [{"_id": f"s{number}", "pred": " ".join(answer.split()[:given]), "answers": [answer], "all_classes": None,
             "length": 100} for number, given in enumerate(words_given)]


def test_the_report_seed_reproduces_every_interval(tmp_path):
    write_run(tmp_path / "runs", "fullkv", None, {"qasper": 12},
              {"qasper": partly_right_rows([8, 7, 6, 5, 4, 3, 2, 1, 8, 8, 5, 3])})
    write_run(tmp_path / "runs", "snapkv", 64, {"qasper": 12},
              {"qasper": partly_right_rows([8, 1, 2, 5, 4, 1, 2, 1, 3, 8, 5, 0])})

    def bounds_with(seed: int, name: str) -> pd.DataFrame:
        result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / name),
                                           "--format", "csv", "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        return pd.concat([pd.read_csv(tmp_path / name / "longbench.csv"),
                          pd.read_csv(tmp_path / name / "longbench_vs_fullkv.csv")])

    first, again, other = bounds_with(7, "first"), bounds_with(7, "again"), bounds_with(8, "other")
    pd.testing.assert_frame_equal(first, again)
    assert not first["qasper low"].equals(other["qasper low"]) or not first["qasper high"].equals(other["qasper high"])


def _predictions(folder: Path, task: str, scores_right: list[bool]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"_id": f"s{number}", "pred": "Paris" if right else "London", "answers": ["Paris"], "all_classes": None,
             "length": 100} for number, right in enumerate(scores_right)]
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_eval_prints_intervals_and_the_paired_difference_from_a_reference(tmp_path):
    _predictions(tmp_path / "full", "qasper", [True] * 8)
    _predictions(tmp_path / "snap", "qasper", [True] * 4 + [False] * 4 + [True])  # s8: not in the reference
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "snap"), "--against-run", str(tmp_path / "full"),
                                       "--json", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    header, qasper, average = result.stdout.splitlines()[:3]
    assert header.split() == ["task", "category", "n", "score", "95%", "interval", "difference", "95%", "interval",
                              "shared", "rougeL_vs_reference"]
    assert qasper.split()[:4] == ["qasper", "single-doc", "QA", "9"]
    scores = json.loads(out.read_text())["qasper"]
    # s4..s7 lose 100 points each against the reference; s0..s3 lose nothing
    assert scores["difference"] == -50.0 and scores["n_matched"] == 8
    assert -100 <= scores["difference_low"] < -50 < scores["difference_high"] <= 0
    itself = CliRunner().invoke(main, ["eval", str(tmp_path / "full"), "--against-run", str(tmp_path / "full"),
                                       "--json", str(out)])
    assert itself.exit_code == 0, itself.output
    assert {key: json.loads(out.read_text())["qasper"][key] for key in ("difference", "difference_low",
                                                                        "difference_high")} == dict.fromkeys(
        ("difference", "difference_low", "difference_high"), 0.0)
    assert "0.00..0.00" in itself.stdout


def test_the_capacity_plot_gets_each_points_interval(tmp_path, monkeypatch):
    from tests.test_report import _capacity_points

    recorded = _capacity_points(monkeypatch)
    for capacity, (right, wrong) in {64: (2, 4), 128: (4, 2)}.items():
        write_run(tmp_path, "snapkv", capacity, {"qasper": 6}, {"qasper": qa_rows(right, wrong)})
    write_report([tmp_path], tmp_path / "report", ["md"])
    (points,) = recorded
    frame, samples = load_runs_and_samples(tmp_path)
    table = leaderboard(frame, task_draws(samples, seed=0), seed=0)
    assert sorted(table.runs["capacity"].dropna()) == [64, 128]
    for position, capacity in enumerate(table.runs["capacity"]):
        cell = table.cells[position][table.columns.index("Avg")]
        point = points[(points["capacity"] == capacity) & (points["panel"] == "LongBench Avg")].iloc[0]
        assert (point["low"], point["high"]) == (cell.low, cell.high)
        assert point["low"] < point["score"] < point["high"]


@pytest.mark.parametrize("command", ["report", "eval"])
def test_a_negative_seed_is_one_line_and_exit_2(tmp_path, command):
    # numpy takes no negative seed: refused by the option, before any file is read
    result = CliRunner().invoke(main, [command, str(tmp_path), "--seed", "-1"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: Invalid value for '--seed': -1 is not in the range x>=0.")
