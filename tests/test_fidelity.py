"""`kvbench eval --against-run`: ROUGE-L of a run's predictions against a reference run's."""

import json

from click.testing import CliRunner

from kvbench.cli import main
from kvbench.tasks.metrics import rouge_score


def write_run(folder, task, predictions):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as handle:
        for _id, pred in predictions.items():
            handle.write(json.dumps({"_id": _id, "pred": pred, "answers": ["x"], "all_classes": None, "length": 10}) + "\n")


def test_fidelity_is_the_mean_rouge_l_over_shared_ids(tmp_path):
    write_run(tmp_path / "full", "qasper", {"a": "the cat sat on the mat", "b": "", "c": "only in the reference"})
    write_run(tmp_path / "snap", "qasper", {"a": "the cat sat", "b": "", "d": "only here"})
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "snap"), "--against-run", str(tmp_path / "full"),
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    expected = round(100 * (rouge_score("the cat sat", "the cat sat on the mat") + 1.0) / 2, 2)
    assert 0 < expected < 100
    assert json.loads(out.read_text())["qasper"]["rougeL_vs_reference"] == expected
    assert "rougeL_vs_reference" in result.output


def test_missing_reference_run_is_one_line(tmp_path):
    write_run(tmp_path / "snap", "qasper", {"a": "x"})
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "snap"), "--against-run", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output
