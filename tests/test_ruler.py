"""RULER: prompts of exact length in a real tokenizer, answers in the context, seeded generation, RULER's scorers,
the context/question split (and question-agnostic requests split there), the offline QA note, the report's tables,
and the refusals."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.errors import KvbenchError, TaskDataUnavailable
from kvbench.harness.grid import tasks_with_data
from kvbench.harness.run import sample_request
from kvbench.report import load_runs
from kvbench.report.load import load_runs_and_samples
from kvbench.report.tables import leaderboard, ruler_table, ruler_tasks_table
from kvbench.report.uncertainty import task_draws
from kvbench.tasks import build_tasks, get_task, resolve_task_names
from kvbench.tasks.needle import LENGTH_TOLERANCE
from kvbench.tasks.ruler import RULER_TASKS, string_match_all, string_match_part
from tests.test_report import cell_texts, write_run

SYNTHETIC = [name for name, spec in RULER_TASKS.items() if spec.family != "qa"]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2's tokenizer (byte-level BPE with a chat template), converted once from its GGUF."""
    from transformers import AutoTokenizer

    from kvbench.harness.model import resolve_model_source

    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(None).location)
    except KvbenchError as error:
        pytest.skip(f"the embedded model is not installed: {error}")


def built(task, sample, tokenizer):
    context_ids, question_ids = task.prompt_parts(sample, tokenizer, 10**6)
    return context_ids, question_ids, task.prompt_ids(sample, tokenizer, 10**6), task.row_fields(sample)


# -- generation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC)
def test_prompts_have_the_length_less_the_answer_and_hide_the_answers_in_the_context(name, tokenizer):
    task = get_task(name, lengths="1024,2048", num_samples=1)
    spec = RULER_TASKS[name]
    for sample in task.load_samples():
        context_ids, question_ids, prompt_ids, fields = built(task, sample, tokenizer)
        assert abs(len(prompt_ids) - (sample["length"] - spec.max_new_tokens)) <= LENGTH_TOLERANCE
        assert prompt_ids == context_ids + question_ids
        context, question = tokenizer.decode(context_ids), tokenizer.decode(question_ids)
        assert fields["answers"] and all(answer in context for answer in fields["answers"])
        # the question part: the template's question, then the answer prefix after the assistant's turn opens
        assert "<|im_start|>user" in context
        assert question.split("<|im_start|>assistant\n", 1)[1].startswith(spec.answer_prefix[:9])
        for answer in fields["answers"]:
            assert answer not in question or name == "vt"  # vt's question names the value, not the variables


def test_each_family_lays_out_its_haystack_as_ruler(tokenizer):
    task = get_task("niah_multivalue", lengths="2048", num_samples=1)
    sample = task.load_samples()[0]
    context_ids, question_ids, _, fields = built(task, sample, tokenizer)
    context = tokenizer.decode(context_ids)
    assert len(fields["answers"]) == 4
    assert context.count("One of the special magic numbers for ") == 4
    assert "Some special magic numbers are hidden" in context  # plural wording with several values
    assert "What are all the special magic numbers for" in tokenizer.decode(question_ids)

    single = get_task("niah_single_1", lengths="1024", num_samples=1)
    sample = single.load_samples()[0]
    context_ids, question_ids, _, fields = built(single, sample, tokenizer)
    assert "A special magic number is hidden" in tokenizer.decode(context_ids)
    assert "The grass is green. The sky is blue." in tokenizer.decode(context_ids)
    assert tokenizer.decode(question_ids).endswith(" mentioned in the provided text is")

    vt = get_task("vt", lengths="1024", num_samples=1)
    sample = vt.load_samples()[0]
    context_ids, question_ids, _, fields = built(vt, sample, tokenizer)
    context = tokenizer.decode(context_ids)
    names = fields["answers"]
    assert len(names) == 5 and all(f"VAR {later} = VAR {earlier}" in context for earlier, later in zip(names, names[1:]))
    assert context.count("Memorize and track") == 2  # the worked example, then the task

    cwe = get_task("cwe", lengths="1024", num_samples=1)
    sample = cwe.load_samples()[0]
    context_ids, _, _, fields = built(cwe, sample, tokenizer)
    listing = tokenizer.decode(context_ids).rsplit("most often.\n", 1)[1]
    counts = {word: listing.count(f". {word} ") + listing.endswith(f". {word}") for word in fields["answers"]}
    assert len(fields["answers"]) == 10 and min(counts.values()) >= 6  # 6 repeats below 4096 tokens

    fwe = get_task("fwe", lengths="1024", num_samples=1)
    sample = fwe.load_samples()[0]
    context_ids, _, _, fields = built(fwe, sample, tokenizer)
    words = tokenizer.decode(context_ids).rsplit("coded words. ", 1)[1].split()
    top = sorted(set(words), key=words.count, reverse=True)
    assert top[0] == "..." and top[1:4] == fields["answers"]


def test_generation_is_decided_by_the_seed(tokenizer):
    def prompt(seed, name="niah_multikey_1"):
        task = get_task(name, lengths="1024", num_samples=2, seed=seed)
        sample = task.load_samples()[1]
        _, _, ids, fields = built(task, sample, tokenizer)
        return ids, fields["answers"]

    assert prompt(7) == prompt("7")
    assert prompt(7)[1] != prompt(8)[1] and prompt(7)[0] != prompt(8)[0]
    assert prompt(7, "cwe") == prompt(7, "cwe")


def test_samples_are_index_major_so_a_limit_keeps_every_length():
    task = get_task("niah_single_1", lengths="2048,1024", num_samples=2)
    assert [sample["_id"] for sample in task.load_samples()] == ["len1024-0", "len2048-0", "len1024-1", "len2048-1"]
    assert task.identity()["seed"] == 42 and task.settings()["lengths"] == [1024, 2048]


def write_qa_data(folder, questions=40):
    """RULER's squad.json / hotpotqa.json formats, small: one article of many paragraphs; many hotpot items."""
    paragraphs = [{"context": f"Paragraph {i} tells that the river number {i} is called Riv{i}x. " * 4,
                   "qas": [{"question": f"What is river {i} called?", "is_impossible": False,
                            "answers": [{"text": f"Riv{i}x"}, {"text": f"riv{i}x"}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
                  for i in range(questions)]
    (folder / "squad.json").write_text(json.dumps({"data": [{"title": "Rivers", "paragraphs": paragraphs}]}))
    hotpot = [{"question": f"Which town has tower {i}?", "answer": f"Town{i}z",
               "context": [[f"Title {i}-{j}", [f"Tower {i} stands in Town{i}z. ", f"Filler sentence {j}."]]
                           for j in range(10)]} for i in range(questions)]
    (folder / "hotpotqa.json").write_text(json.dumps(hotpot))
    return folder


def test_qa_tasks_from_ruler_files(tmp_path, tokenizer):
    data_dir = str(write_qa_data(tmp_path))
    for name, length, answer in (("qa_1", 1024, "Riv3x"), ("qa_2", 2048, "Town3z")):
        task = get_task(name, lengths=str(length), num_samples=4)
        sample = task.load_samples(data_dir)[3]
        context_ids, question_ids, ids, fields = built(task, sample, tokenizer)
        assert abs(len(ids) - (length - 32)) <= LENGTH_TOLERANCE
        assert fields["answers"][0] == answer and answer in tokenizer.decode(context_ids)
        assert "Question: " in tokenizer.decode(question_ids)
        assert task.identity(data_dir)["qa_data"]


@pytest.mark.parametrize("name", list(RULER_TASKS))
def test_question_agnostic_requests_split_where_prompt_parts_does(name, tokenizer, tmp_path):
    """The context (the answers with it) is compressed; the question part, the template's question, the chat
    template's turn switch and the answer prefix, extends the compressed cache; the method reads the context."""
    spec = RULER_TASKS[name]
    data_dir = str(write_qa_data(tmp_path))
    task = get_task(name, lengths=str(max(1024, spec.min_length)), num_samples=1)
    sample = task.load_samples(data_dir)[0]
    request = sample_request(task, sample, tokenizer, 10**6, set(), question_agnostic=True)
    context_ids, question_ids = task.prompt_parts(sample, tokenizer, 10**6)
    assert request.prompt_ids == context_ids + question_ids and request.question_start == len(context_ids)
    question = task.question_part(sample)
    assert question.strip() and request.sample["prompt_text"] + question == task.prompt_text(sample)
    context, question_part = tokenizer.decode(context_ids), tokenizer.decode(question_ids)
    assert context.endswith(request.sample["prompt_text"][-40:])  # the ids split where the text does
    assert question_part.startswith(question)
    turn_switch = "<|im_end|>\n<|im_start|>assistant\n"
    assert question_part[len(question):].startswith(turn_switch)
    assert question_part[len(question) + len(turn_switch):].startswith(spec.answer_prefix[:9])
    assert all(answer.lower() in context.lower() for answer in task.row_fields(sample)["answers"])


# -- scoring ------------------------------------------------------------------------------------------------


def test_ruler_scorers_on_hand_made_predictions():
    assert string_match_all("The numbers are 1234 and 5678.", ["1234", "5678", "9999"]) == pytest.approx(200 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 100
    assert string_match_all("", ["x"]) == 0
    assert string_match_part("It is Paris, France", ["London", "paris"]) == 100
    assert string_match_part("Lyon", ["London", "Paris"]) == 0

    niah = get_task("niah_multivalue", lengths="1024,2048")
    rows = [{"pred": "1 2 3 4", "answers": ["1", "2", "3", "4"], "length": 1024},
            {"pred": "1 2", "answers": ["1", "2", "3", "4"], "length": 1024},
            {"pred": "none", "answers": ["1"], "length": 2048}]
    assert niah.score(rows) == {"score": 50.0, "1024": 75.0, "2048": 0.0}
    assert niah.score_row(rows[1]) == {"string_match_all": 50.0}
    qa = get_task("qa_1")
    assert qa.score([{"pred": "riv3x", "answers": ["Riv3x", "nope"], "length": 4096}])["score"] == 100
    assert niah.postprocess("  a\x00b\tc \n") == "a\nb\nc"


# -- refusals and the offline note --------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--tasks", "niah_single_9"], "unknown task 'niah_single_9'; did you mean niah_single_"),
    (["--tasks", "ruler", "--lengths", "1024"], "qa_2 needs --lengths of at least 2048 tokens"),
    (["--tasks", "vt", "--lengths", "700,4096"], "vt needs --lengths of at least 1024 tokens"),
    (["--tasks", "cwe", "--seed", "1.5"], "--seed must be an integer, got '1.5'"),
    (["--tasks", "cwe", "--num-samples", "0"], "--num-samples must be a positive integer"),
    (["--tasks", "trec", "--seed", "3"], "--seed applies to no task"),
])
def test_bad_input_is_one_line_and_exit_2_before_the_model_loads(args, message, tmp_path, monkeypatch):
    import kvbench.harness.grid as grid

    monkeypatch.setattr(grid, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = CliRunner().invoke(main, ["run", "--output", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output


def test_too_short_for_the_tokenizer_is_one_line(tokenizer):
    task = get_task("niah_multikey_3", lengths="640", num_samples=1)
    sample = task.load_samples()[0]
    with pytest.raises(KvbenchError, match=r"niah_multikey_3 needs a length of at least \d+ tokens with this tokenizer"):
        task.prompt_ids({**sample, "length": 200}, tokenizer, 10**6)


def test_offline_qa_is_left_out_in_one_note_and_the_others_run(tmp_path):
    notes = []
    tasks = build_tasks("niah_single_1,qa_1,qa_2")
    kept = tasks_with_data(tasks, str(tmp_path), notes.append)  # HF_HUB_OFFLINE (conftest): no hub
    assert [task.name for task in kept] == ["niah_single_1"]
    assert len(notes) == 1 and "qa_1" in notes[0] and "qa_2" in notes[0] and "squad.json" in notes[0]
    with pytest.raises(TaskDataUnavailable, match="qa_1"):
        tasks_with_data(build_tasks("qa_1"), None, notes.append)
    assert tasks_with_data(build_tasks("qa_1"), str(write_qa_data(tmp_path)), notes.append)[0].name == "qa_1"


def test_ruler_group_and_names():
    assert resolve_task_names("ruler") == list(RULER_TASKS) and len(RULER_TASKS) == 13
    assert resolve_task_names("ruler,vt,needle")[-1] == "needle"


# -- the report ---------------------------------------------------------------------------------------------


def ruler_rows(right_1k: int, right_2k: int) -> list[dict]:
    rows = [{"_id": f"len{length}-{index}", "pred": "42" if index < right else "no", "answers": ["42"],
             "all_classes": None, "length": length}
            for length, right in ((1024, right_1k), (2048, right_2k)) for index in range(2)]
    return rows


def test_report_shows_ruler_by_length_and_task_apart_from_longbench(tmp_path):
    write_run(tmp_path, "fullkv", None, {"vt": 4, "cwe": 4, "trec": 1},
              {"vt": ruler_rows(2, 1), "cwe": ruler_rows(2, 0),
               "trec": [{"_id": "t", "pred": "A", "answers": ["A"], "all_classes": ["A"], "length": 10}]})
    write_run(tmp_path, "snapkv", 128, {"vt": 4, "cwe": 4}, {"vt": ruler_rows(1, 1), "cwe": ruler_rows(1, 0)})
    frame = load_runs(tmp_path)
    by_length = ruler_table(frame)
    assert by_length.columns == ["1024", "2048", "Avg"]
    texts = {key: {column: text.strip("*") for column, text in row.items()}
             for key, row in cell_texts(by_length).items()}
    full, snap = texts[("fullkv", None)], texts[("snapkv", 128)]
    assert (full["1024"], full["2048"], full["Avg"]) == ("100.00", "25.00", "62.50")
    assert (snap["1024"], snap["2048"], snap["Avg"]) == ("50.00", "25.00", "37.50")
    assert cell_texts(ruler_tasks_table(frame))[("fullkv", None)]["vt"].strip("*") == "75.00"
    assert "vt" not in leaderboard(frame).columns and "trec" in leaderboard(frame).columns
    assert not math.isnan(frame.loc[frame["task"] == "vt", "1024"].iloc[0])


def test_ruler_tables_give_intervals_over_each_lengths_own_samples(tmp_path):
    # vt: both 1024-token samples right, one of the two 2048-token ones; cwe: both right at 1024, none at 2048
    write_run(tmp_path, "fullkv", None, {"vt": 4, "cwe": 4}, {"vt": ruler_rows(2, 1), "cwe": ruler_rows(2, 0)})
    frame, samples = load_runs_and_samples(tmp_path)
    draws = task_draws(samples, seed=0)
    by_length = ruler_table(frame, draws, seed=0)
    cells = dict(zip(by_length.columns, by_length.cells[0]))
    # every 1024-token sample is right: no resample moves the mean; at 2048 the vt pair can lose or gain it
    assert cells["1024"].text == "100.00 ± 0.0" and (cells["1024"].low, cells["1024"].high) == (100.0, 100.0)
    assert cells["2048"].value == 25.0 and cells["2048"].low < 25.0 < cells["2048"].high
    assert cells["Avg"].low <= 62.5 <= cells["Avg"].high and "±" in cells["Avg"].text
    assert "2048 low" in by_length.numbers().columns and any("bootstrap" in note for note in by_length.notes)
    by_task = ruler_tasks_table(frame, draws, seed=0)
    vt = dict(zip(by_task.columns, by_task.cells[0]))["vt"]
    assert vt.value == 75.0 and vt.low < 75.0 < vt.high


def test_capacity_plot_has_a_ruler_panel(tmp_path):
    from kvbench.report.write import _capacity_points

    write_run(tmp_path, "snapkv", 64, {"vt": 4}, {"vt": ruler_rows(1, 0)})
    write_run(tmp_path, "snapkv", 128, {"vt": 4}, {"vt": ruler_rows(2, 1)})
    frame = load_runs(tmp_path)
    points = _capacity_points(frame, [ruler_table(frame)])
    ruler = points[points["panel"] == "RULER Avg"].sort_values("capacity")
    assert ruler["capacity"].tolist() == [64, 128] and ruler["score"].tolist() == [25.0, 75.0]
    assert ruler["complete"].all()
