"""The LongBench task table, data loading, prompt building, the Task class and the task registry."""

import json
import time
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kvbench.errors import KvbenchError
from kvbench.tasks import get_task, resolve_task_names
from kvbench.tasks import longbench_spec
from kvbench.tasks.longbench import LongBenchTask, build_prompt_ids, fill_template, load_task_samples, truncate_middle
from kvbench.tasks.longbench_spec import LONGBENCH_E_TASKS, LONGBENCH_TASKS, TASK_TABLE, length_bucket

WORDS = "zero one two three four five six seven eight nine ten".split()
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}"


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per space-separated word (plus the chat markers), a <s> in front, decoded with spaces."""
    vocabulary = ["<s>", "<unk>", "<user>", "<assistant>", *WORDS]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(vocabulary)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="<unk>")
    wrapped.chat_template = chat_template
    return wrapped


def ids_of(text: str) -> list[int]:
    return [4 + WORDS.index(word) for word in text.split()]


# --- the table -------------------------------------------------------------------------------


def test_table_holds_the_21_tasks_in_official_order():
    assert LONGBENCH_TASKS[:4] == ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"]
    assert LONGBENCH_TASKS[-2:] == ["lcc", "repobench-p"]
    assert len(LONGBENCH_TASKS) == 21 and list(TASK_TABLE) == LONGBENCH_TASKS


def test_categories_group_the_tasks_as_longbench_does():
    by_category = {}
    for info in TASK_TABLE.values():
        by_category.setdefault(info.category, []).append(info.name)
    assert by_category == {
        "single-doc QA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
        "multi-doc QA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
        "summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
        "few-shot": ["trec", "triviaqa", "samsum", "lsht"],
        "synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
        "code": ["lcc", "repobench-p"],
    }


def test_official_quirks_of_prompting_and_post_processing_are_in_the_table():
    assert {name for name, info in TASK_TABLE.items() if info.raw_prompt} == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert {name for name, info in TASK_TABLE.items() if info.first_line_only} == {"trec", "triviaqa", "samsum", "lsht"}
    assert {name for name, info in TASK_TABLE.items() if info.language == "zh"} == {
        "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"
    }


def test_generation_budgets_and_metrics_follow_the_official_config():
    assert (TASK_TABLE["gov_report"].max_new_tokens, TASK_TABLE["gov_report"].metric) == (512, "rouge_score")
    assert (TASK_TABLE["hotpotqa"].max_new_tokens, TASK_TABLE["hotpotqa"].metric) == (32, "qa_f1_score")
    assert (TASK_TABLE["dureader"].max_new_tokens, TASK_TABLE["dureader"].metric) == (128, "rouge_zh_score")
    assert (TASK_TABLE["lsht"].max_new_tokens, TASK_TABLE["lsht"].metric) == (64, "classification_score")


def test_templates_are_the_official_text():
    assert TASK_TABLE["lcc"].prompt_template == "Please complete the code given below. \n{context}Next line of code:\n"
    # the official narrativeqa prompt's typo stays, since published scores were made with it
    assert "as" + "concisely as you can" in TASK_TABLE["narrativeqa"].prompt_template
    assert TASK_TABLE["multifieldqa_zh"].prompt_template.endswith("问题：{input}\n回答：")


def test_longbench_e_has_its_13_tasks_and_three_length_buckets():
    assert LONGBENCH_E_TASKS == [
        "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
        "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    ]
    assert [length_bucket(length) for length in (0, 3999, 4000, 7999, 8000, 100_000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


# --- prompts ---------------------------------------------------------------------------------


def test_fill_template_puts_context_and_input_in_place(longbench_mini):
    sample = json.loads((longbench_mini / "hotpotqa.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = fill_template(TASK_TABLE["hotpotqa"], sample)
    assert prompt.startswith("Answer the question based on the given passages.")
    assert f"The following are given passages.\n{sample['context']}\n\n" in prompt
    assert prompt.endswith(f"Question: {sample['input']}\nAnswer:")


def test_fill_template_keeps_braces_of_code_in_the_context():
    prompt = fill_template(TASK_TABLE["lcc"], {"context": "if (x) {\n", "input": ""})
    assert prompt == "Please complete the code given below. \nif (x) {\nNext line of code:\n"


def test_fill_template_names_a_missing_field():
    with pytest.raises(KvbenchError, match="'input'"):
        fill_template(TASK_TABLE["trec"], {"_id": "x", "context": "c"})


def test_truncate_middle_keeps_first_and_last_half_like_pred_py():
    tokenizer = word_tokenizer()
    text = "one two three four five six seven eight"  # 9 tokens with <s>
    assert truncate_middle(tokenizer, text, 9) == text
    # first 3 ids are <s> one two (the <s> decodes to nothing), last 3 are six seven eight;
    # the halves are decoded separately and joined with nothing between
    assert truncate_middle(tokenizer, text, 6) == "one two" + "six seven eight"
    assert truncate_middle(tokenizer, text, 7) == "one two" + "six seven eight"


def test_raw_prompt_tasks_skip_the_chat_template():
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    ids = build_prompt_ids(TASK_TABLE["lcc"], {"context": "one two ", "input": ""}, tokenizer, 100)
    # <s>, then the plain filled template: "Please complete the code given below." and
    # "Next line of code:" are words this vocabulary lacks (<unk> = 1); no <user>/<assistant>
    assert ids == [0, *[1] * 6, *ids_of("one two"), *[1] * 4]


def test_chat_tasks_go_through_the_chat_template():
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    info = longbench_spec.TaskInfo(
        name="toy", prompt_template="{context} {input}", max_new_tokens=8, metric="qa_f1_score",
        category="single-doc QA", language="en", raw_prompt=False, first_line_only=False, in_longbench_e=False,
    )
    ids = build_prompt_ids(info, {"context": "one two three four five six", "input": "seven"}, tokenizer, 6)
    # truncated to "one two" + "five six seven" (joined: "twofive" is one unknown word), then
    # <s><user> ... <assistant> from the template, without a second <s>
    assert ids == [0, 2, *ids_of("one"), 1, *ids_of("six seven"), 3]


def test_without_a_chat_template_every_prompt_is_raw():
    tokenizer = word_tokenizer(chat_template=None)
    info = longbench_spec.TaskInfo(
        name="toy", prompt_template="{context}", max_new_tokens=8, metric="qa_f1_score",
        category="single-doc QA", language="en", raw_prompt=False, first_line_only=False, in_longbench_e=False,
    )
    assert build_prompt_ids(info, {"context": "one two"}, tokenizer, 100) == [0, *ids_of("one two")]


# --- data ------------------------------------------------------------------------------------


def test_load_samples_from_a_data_dir(longbench_mini):
    samples = load_task_samples("trec", longbench_mini)
    assert len(samples) == 8
    assert all(sample["dataset"] == "trec" and sample["all_classes"] for sample in samples)


def test_longbench_e_reads_the_e_file(tmp_path):
    sample = {"_id": "a", "context": "c", "input": "i", "answers": ["x"], "length": 5000, "all_classes": None}
    (tmp_path / "qasper_e.jsonl").write_text(json.dumps(sample) + "\n")
    assert load_task_samples("qasper", tmp_path, longbench_e=True) == [sample]
    with pytest.raises(KvbenchError, match="qasper.jsonl: no such file"):
        load_task_samples("qasper", tmp_path)
    with pytest.raises(KvbenchError, match="narrativeqa has no LongBench-E variant"):
        load_task_samples("narrativeqa", tmp_path, longbench_e=True)


def test_bad_data_lines_are_named_by_file_and_line(tmp_path):
    good = json.dumps({"_id": "a", "context": "c", "input": "i", "answers": ["x"], "length": 1})
    (tmp_path / "trec.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(KvbenchError, match=r"trec.jsonl:2: not valid JSON"):
        load_task_samples("trec", tmp_path)
    (tmp_path / "trec.jsonl").write_text(good + "\n" + good + "\n")
    with pytest.raises(KvbenchError, match=r"trec.jsonl:2: _id 'a' appears twice"):
        load_task_samples("trec", tmp_path)
    (tmp_path / "trec.jsonl").write_text(json.dumps({"_id": "a", "context": "c"}) + "\n")
    with pytest.raises(KvbenchError, match=r"trec.jsonl:1: sample lacks input, answers, length"):
        load_task_samples("trec", tmp_path)


def _fake_hub_snapshot(tmp_path: Path, revision: str = "abc123") -> Path:
    """A data.zip laid out as LongBench's, where the hub cache keeps it (snapshots/<revision>/)."""
    archive = tmp_path / "hub" / "snapshots" / revision / "data.zip"
    archive.parent.mkdir(parents=True)
    sample = {"_id": "s1", "context": "c", "input": "i", "answers": ["x"], "length": 10, "all_classes": None}
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("data/qasper.jsonl", json.dumps(sample) + "\n")
        zipped.writestr("data/qasper_e.jsonl", json.dumps({**sample, "_id": "e1"}) + "\n")
    return archive


def test_without_data_dir_the_hub_archive_is_extracted_once(tmp_path, monkeypatch):
    archive = _fake_hub_snapshot(tmp_path)
    requests = []

    def fake_download(repo_id, filename, repo_type, local_files_only=False):
        requests.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("KVBENCH_HOME", str(tmp_path / "cache"))
    assert [sample["_id"] for sample in load_task_samples("qasper")] == ["s1"]
    assert requests == [("THUDM/LongBench", "data.zip", "dataset")]
    assert (tmp_path / "cache" / "longbench" / "abc123" / "data" / "qasper.jsonl").is_file()
    archive.unlink()  # a second load reads the extracted files, not the archive
    assert [sample["_id"] for sample in load_task_samples("qasper", longbench_e=True)] == ["e1"]


def test_offline_without_cache_says_to_pass_data_dir_at_once(monkeypatch):
    asked = []

    def not_cached(*args, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(KvbenchError, match="--data-dir DIR") as raised:
        load_task_samples("qasper")
    assert "\n" not in str(raised.value)
    # Only the cache was asked: no download attempt, so no half minute of retries before the message.
    assert asked == [True] and time.perf_counter() - started < 5


# --- the task and the registry ---------------------------------------------------------------


def test_longbench_task_serves_the_run_loop(longbench_mini):
    task = get_task("triviaqa")
    assert isinstance(task, LongBenchTask)
    assert (task.name, task.category, task.max_new_tokens) == ("triviaqa", "few-shot", 32)
    sample = task.load_samples(str(longbench_mini))[0]
    assert task.prompt_text(sample) == TASK_TABLE["triviaqa"].prompt_template.format(**sample)
    assert task.row_fields(sample) == {
        "answers": sample["answers"], "all_classes": None, "length": sample["length"], "language": "en",
    }
    assert task.postprocess("\n\n55\nQuestion: next") == "55"
    assert get_task("hotpotqa").postprocess("\nParis\nFrance") == "\nParis\nFrance"
    rows = [{"pred": answer, **task.row_fields(sample)} for answer in ("55", "no")]
    assert task.score(rows) == {"score": 50.0}


def test_longbench_e_task_scores_per_length_bucket():
    task = get_task("trec_e")
    assert (task.name, task.info.name, task.longbench_e) == ("trec_e", "trec", True)
    classes = ["Date", "Individual"]
    rows = [
        {"pred": "Date", "answers": ["Date"], "all_classes": classes, "length": 1000},
        {"pred": "Individual", "answers": ["Date"], "all_classes": classes, "length": 9000},
        {"pred": "Date", "answers": ["Date"], "all_classes": classes, "length": 9500},
    ]
    assert task.score(rows) == {"score": 66.67, "0-4k": 100.0, "4-8k": None, "8k+": 50.0}


def test_registry_knows_every_task_and_variant():
    assert get_task("repobench-p").info.metric == "code_sim_score"
    assert get_task("lcc_e").longbench_e
    with pytest.raises(KvbenchError, match="unknown task 'narrativeqa_e'"):
        get_task("narrativeqa_e")


def test_get_task_passes_only_the_options_a_task_takes():
    # LongBench tasks take no options: options meant for other tasks are not passed on
    assert get_task("qasper", lengths="1000:2000:2", depths=None).name == "qasper"


def test_resolve_task_names_expands_groups_and_keeps_order():
    assert resolve_task_names("longbench") == LONGBENCH_TASKS
    assert resolve_task_names("longbench-e") == [f"{name}_e" for name in LONGBENCH_E_TASKS]
    assert resolve_task_names(" trec, qasper ,trec,") == ["trec", "qasper"]
    assert resolve_task_names("lcc,longbench")[:2] == ["lcc", "narrativeqa"]


def test_resolve_task_names_lists_known_names_for_an_unknown_one():
    with pytest.raises(KvbenchError, match=r"unknown task 'qaspr'; did you mean qasper or qasper_e\?$"):
        resolve_task_names("qasper,qaspr")
    # A long unknown name is cut short, and the message never lists every task.
    with pytest.raises(KvbenchError) as raised:
        resolve_task_names("x" * 10000)
    assert len(str(raised.value)) < 200
    with pytest.raises(KvbenchError, match="no task"):
        resolve_task_names(" , ")
