"""WindowKV's task classifier: truncation, labels, data, checkpoints, the CLI, and one real training run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, GPT2Config

from kvbench.classifier import checkpoint_digest, default_checkpoint_path, load_classifier, save_checkpoint
from kvbench.classifier.checkpoint import CHECKPOINT_FILE, LEGACY_METADATA_FILE, METADATA_KEY, read_metadata
from kvbench.classifier.data import (LabelledPrompt, choose_held_out_tasks, label_of_category, load_labelled_prompts,
                                     split_held_out)
from kvbench.classifier.model import (EMBEDDED_ENCODER, LABELS, PromptReader, TaskClassifierModel,
                                      answer_cue, demonstration_count, encoder_source, load_encoder, pad_batch)
from kvbench.classifier import train
from kvbench.classifier.train import CachedPrompts, TrainingConfig, first_token_last_layer, prompt_weights
from kvbench.console import progress_bars_enabled
from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.tasks.longbench import fill_template
from kvbench.tasks.longbench_spec import TASK_TABLE

QA_TASKS = {"narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader"}


@pytest.fixture(scope="module")
def minilm():
    """(tokenizer, encoder model, pooler_is_trained) of the embedded MiniLM, loaded once."""
    return load_encoder(EMBEDDED_ENCODER)


def sample(sample_id: str, context: str | None = None, question: str = "What?") -> dict:
    return {"_id": sample_id, "context": context or f"Context of {sample_id}.", "input": question, "answers": ["x"],
            "length": 3, "all_classes": None}


def write_task(folder, task: str, samples: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples), encoding="utf-8")


# -- what the classifier reads, labels ---------------------------------------------------------


def body_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def test_token_reader_keeps_the_first_and_last_tokens_within_special_tokens(minilm):
    tokenizer = minilm[0]
    text = " ".join(f"word{index}" for index in range(2000))
    body = body_ids(tokenizer, text)
    reader = PromptReader(head_tokens=32, tail_tokens=64, paragraphs=False)
    kept = reader.token_ids(tokenizer, text)
    assert kept == [tokenizer.cls_token_id] + body[:32] + body[-64:] + [tokenizer.sep_token_id]
    short = "a short prompt"
    assert reader.token_ids(tokenizer, short) == tokenizer(short)["input_ids"]
    assert PromptReader(0, 5, paragraphs=False).token_ids(tokenizer, text)[1:-1] == body[-5:]


def test_paragraph_reader_reads_the_instruction_and_the_question_not_the_document(minilm):
    tokenizer = minilm[0]
    document = "\n\n".join(f"Paragraph {index}: " + "gardening tools and the weather. " * 20 for index in range(50))
    prompt = fill_template(TASK_TABLE["multifieldqa_en"], sample("a", document, "Which tool is best?"))
    read = tokenizer.decode(PromptReader(32, 64).token_ids(tokenizer, prompt))
    assert read == ("[CLS] read the following text and answer briefly. now, answer the following question based on the "
                    "above text, only give me the answer and do not output any other words. question : which tool is "
                    "best? answer : [SEP]")
    # Short paragraphs are read while they fit.
    short_paragraphs = "Instruction.\n\nOne.\n\n" + "Body. " * 200 + "\n\nTwo.\n\nQuestion?"
    assert tokenizer.decode(PromptReader(4, 4).token_ids(tokenizer, short_paragraphs)) == "[CLS] instruction. one. two. question? [SEP]"
    # A first or last paragraph longer than its budget gives its first or last tokens.
    long_paragraphs = "one " * 100 + "\n\n" + "middle " * 100 + "\n\n" + "two " * 100
    assert PromptReader(3, 2).token_ids(tokenizer, long_paragraphs)[1:-1] == body_ids(tokenizer, "one one one two two")
    # A prompt that fits is read whole.
    assert PromptReader(32, 64).token_ids(tokenizer, "Short.\n\nQuestion: why?") == tokenizer("Short. Question: why?")["input_ids"]


def test_reader_folds_full_width_punctuation(minilm):
    tokenizer = minilm[0]
    assert (PromptReader(8, 8).token_ids(tokenizer, "问题：什么？\n回答：")
            == PromptReader(8, 8).token_ids(tokenizer, "问题:什么?\n回答:"))
    assert (PromptReader(8, 8, unicode_form="NFC").token_ids(tokenizer, "？")
            != PromptReader(8, 8).token_ids(tokenizer, "？"))


def test_few_shot_prompts_are_told_by_their_repeated_answer_cue():
    demonstrations = "\n\n".join(f"Passage:\nText {index}.\nQuestion:\nWho {index}?\nAnswer:\nX{index}" for index in range(5))
    triviaqa = fill_template(TASK_TABLE["triviaqa"], sample("t", demonstrations, "Passage:\nText.\nQuestion:\nWho?\nAnswer:\n"))
    assert answer_cue(triviaqa) == "Answer:"
    assert demonstration_count(triviaqa) == 6
    trec = fill_template(TASK_TABLE["trec"], sample("t", "Question: A?\nType: Date\nQuestion: B?\nType: Reason",
                                                    "Question: C?\nType:"))
    assert demonstration_count(trec) == 3
    lsht = fill_template(TASK_TABLE["lsht"], sample("l", "新闻内容：\n甲\n类别：体育\n新闻内容：\n乙\n类别：财经", "新闻内容：\n丙\n类别："))
    assert answer_cue(lsht) == "类别：" and demonstration_count(lsht) == 3
    reader = PromptReader()
    assert reader.is_few_shot(triviaqa) and reader.is_few_shot(trec) and reader.is_few_shot(lsht)
    qasper = fill_template(TASK_TABLE["qasper"], sample("q", "An article.\nAnswer: not a cue line of this prompt"))
    assert demonstration_count(qasper) == 2 and not reader.is_few_shot(qasper)
    assert demonstration_count("Write a poem about the sea.") == 0
    assert not PromptReader(min_demonstrations=0).is_few_shot(triviaqa)


def test_reader_settings_are_checked_and_round_trip_through_metadata():
    reader = PromptReader(16, 48, paragraphs=False, unicode_form="NFC", min_demonstrations=0)
    assert PromptReader.from_metadata(reader.to_metadata(), "ckpt") == reader
    for bad, message in ((dict(head_tokens="32"), "reader head_tokens must be an integer >= 0, got '32'"),
                         (dict(tail_tokens=True), "reader tail_tokens must be an integer >= 0, got True"),
                         (dict(head_tokens=0, tail_tokens=0), "at least one token"),
                         (dict(head_tokens=400, tail_tokens=400), "at most 510"),
                         (dict(paragraphs=1), "paragraphs must be true or false"),
                         (dict(unicode_form="NFD"), "unicode_form must be one of NFC, NFKC")):
        with pytest.raises(KvbenchError, match=f"^ckpt: .*{message}"):
            PromptReader.from_metadata({**PromptReader().to_metadata(), **bad}, "ckpt")
    with pytest.raises(KvbenchError, match="reader lacks paragraphs"):
        PromptReader.from_metadata({"head_tokens": 1, "tail_tokens": 1, "unicode_form": "NFC", "min_demonstrations": 0}, "ckpt")
    with pytest.raises(KvbenchError, match="unknown setting"):
        PromptReader.from_metadata({**PromptReader().to_metadata(), "stride": 2}, "ckpt")


def test_labels_follow_the_task_category():
    for name, info in TASK_TABLE.items():
        assert LABELS[label_of_category(info.category)] == ("qa" if name in QA_TASKS else "other"), name
    with pytest.raises(KvbenchError, match="category 'needle' has no classifier label"):
        label_of_category("needle")


# -- data ------------------------------------------------------------------------------------


def test_prompts_merge_folders_once_per_prompt_and_use_the_official_template(tmp_path):
    write_task(tmp_path / "mini", "qasper", [sample("a", "first"), sample("b", "second")])
    write_task(tmp_path / "mini", "trec", [sample("t1")])
    # The same prompt under another id, as longbench-mini's copies of full LongBench samples are.
    write_task(tmp_path / "full", "qasper", [sample("b-full", "second"), sample("c", "third")])
    prompts = load_labelled_prompts([tmp_path / "mini", tmp_path / "full"])
    assert [(p.task, p.sample_id, p.label) for p in prompts] == [("qasper", "a", 0), ("qasper", "b", 0),
                                                                 ("qasper", "c", 0), ("trec", "t1", 1)]
    assert prompts[0].text == fill_template(TASK_TABLE["qasper"], sample("a", "first"))
    assert len(load_labelled_prompts([tmp_path / "mini"], ["qasper"], max_samples_per_task=1)) == 1
    with pytest.raises(KvbenchError, match="no <task>.jsonl for lcc"):
        load_labelled_prompts([tmp_path / "mini"], ["qasper", "lcc"])
    with pytest.raises(KvbenchError, match="no such folder"):
        load_labelled_prompts([tmp_path / "absent"])


def test_held_out_split_is_stratified_by_task():
    prompts = [LabelledPrompt(task, str(index), "text", 0) for task, count in (("a", 10), ("b", 3), ("c", 1))
               for index in range(count)]
    train, held_out = split_held_out(prompts, 0.2, seed=1)
    assert sorted(train + held_out) == list(range(len(prompts)))
    held_out_tasks = [prompts[index].task for index in held_out]
    assert (held_out_tasks.count("a"), held_out_tasks.count("b"), held_out_tasks.count("c")) == (2, 1, 0)
    assert split_held_out(prompts, 0.2, seed=1) == (train, held_out)


def test_held_out_task_choices():
    prompts = [LabelledPrompt(task, "0", "text", 0) for task in ("lcc", "qasper", "narrativeqa", "trec", "repobench-p")]
    assert choose_held_out_tasks("per-category", prompts) == ["narrativeqa", "trec", "lcc"]
    assert choose_held_out_tasks("all", prompts) == ["narrativeqa", "qasper", "trec", "lcc", "repobench-p"]
    assert choose_held_out_tasks("none", prompts) == []
    assert choose_held_out_tasks("trec, lcc", prompts) == ["trec", "lcc"]
    with pytest.raises(KvbenchError, match="--held-out-tasks 'gov_report'"):
        choose_held_out_tasks("gov_report", prompts)


# -- model, checkpoints ------------------------------------------------------------------------------


def test_minilm_pooler_is_untrained_so_the_head_reads_the_first_token(minilm):
    assert minilm[2] is False


def test_first_token_recomputation_matches_the_encoder(minilm):
    tokenizer, encoder_model, _ = minilm
    input_ids, attention_mask = pad_batch(tokenizer, [tokenizer("a first prompt, longer than the other")["input_ids"],
                                                      tokenizer("a second")["input_ids"]])
    with torch.no_grad():
        output = encoder_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        recomputed = first_token_last_layer(encoder_model.encoder.layer[-1], output.hidden_states[-2], attention_mask.bool())
    torch.testing.assert_close(recomputed, output.last_hidden_state[:, 0], atol=1e-5, rtol=1e-4)


def tiny_local_encoder(folder, config, pooler_bias: float | None = None):
    """A small randomly initialised encoder saved to ``folder`` with MiniLM's tokenizer files."""
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    if pooler_bias is not None:
        with torch.no_grad():
            model.pooler.dense.bias.fill_(pooler_bias)
    model.save_pretrained(folder)
    source = encoder_source(EMBEDDED_ENCODER)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{source}/{name}", folder / name)
    return str(folder)


def tiny_bert_config():
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def test_trained_pooler_feeds_the_head_and_is_saved_with_it(tmp_path):
    untrained = tiny_local_encoder(tmp_path / "untrained", tiny_bert_config(), pooler_bias=0.0)
    assert load_encoder(untrained)[2] is False
    trained = tiny_local_encoder(tmp_path / "trained", tiny_bert_config(), pooler_bias=0.1)
    tokenizer, encoder_model, pooler_is_trained = load_encoder(trained)
    assert pooler_is_trained is True
    model = TaskClassifierModel(encoder_model, "pooler").eval()
    assert {"encoder.pooler.dense.weight", "encoder.pooler.dense.bias", "linear.weight",
            "encoder.encoder.layer.1.output.dense.weight"} <= set(model.trained_parameter_names())
    assert not any(".layer.0." in name for name in model.trained_parameter_names())
    input_ids, attention_mask = pad_batch(tokenizer, [tokenizer("one prompt")["input_ids"]])
    with torch.no_grad():
        output = encoder_model(input_ids=input_ids, attention_mask=attention_mask)
        torch.testing.assert_close(model(input_ids, attention_mask),
                                   model.linear(output.pooler_output))
    save_checkpoint(model, trained, {}, tmp_path / "classifier")
    loaded = load_classifier(tmp_path / "classifier")
    assert loaded.model.pooling == "pooler"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids, attention_mask), model(input_ids, attention_mask))


def test_non_bert_encoder_is_refused_in_one_line(tmp_path):
    folder = tiny_local_encoder(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(KvbenchError, match="encoder of type 'gpt2' is not BERT-style"):
        TaskClassifierModel(load_encoder(folder)[1], "first-token")


def saved_checkpoint(minilm, folder, seed: int = 3, reader: PromptReader | None = None):
    """A checkpoint with a seeded random head and a perturbed last layer, as training would leave them."""
    torch.manual_seed(seed)
    model = TaskClassifierModel(load_encoder(EMBEDDED_ENCODER)[1], "first-token", reader)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in model.trained_parameter_names():
                parameter.add_(torch.randn_like(parameter) * 0.01)
    save_checkpoint(model, EMBEDDED_ENCODER, {"note": "test"}, folder)
    return model.eval()


def test_checkpoint_round_trip_gives_the_same_predictions(minilm, tmp_path, monkeypatch):
    reader = PromptReader(24, 40, paragraphs=True, unicode_form="NFKC", min_demonstrations=3)
    model = saved_checkpoint(minilm, tmp_path / "classifier", reader=reader)
    monkeypatch.setenv("KVBENCH_HOME", str(tmp_path))
    assert default_checkpoint_path() == tmp_path / "classifier"
    assert sorted(path.name for path in (tmp_path / "classifier").iterdir()) == [CHECKPOINT_FILE]
    loaded = load_classifier()
    assert loaded.reader == reader
    prompts = [fill_template(TASK_TABLE["qasper"], sample("a", "A long article.\n\n" * 400)),
               fill_template(TASK_TABLE["lcc"], sample("b", "def f():\n    return 1\n")),
               fill_template(TASK_TABLE["multifieldqa_zh"], sample("c", "很长的文章。" * 300, "什么？"))]
    tokenizer = minilm[0]
    input_ids, attention_mask = pad_batch(tokenizer, [reader.token_ids(tokenizer, text) for text in prompts])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids, attention_mask), model(input_ids, attention_mask))
        expected = [LABELS[index] for index in model(input_ids, attention_mask).argmax(dim=1).tolist()]
    assert loaded.predict_batch(prompts) == expected
    assert loaded.predict(prompts[1]) == expected[1]
    # Few-shot prompts are "other" by their demonstrations, whatever the encoder says.
    few_shot = fill_template(TASK_TABLE["triviaqa"], sample("t", "Question: A?\nAnswer: a\n\nQuestion: B?\nAnswer: b",
                                                             "Question: C?\nAnswer:"))
    with torch.no_grad():
        loaded.model.linear.bias.copy_(torch.tensor([100.0, -100.0]))  # the encoder now answers "qa" everywhere
    assert loaded.predict_batch([prompts[0], few_shot]) == ["qa", "other"]


def test_checkpoint_digest_names_the_content(minilm, tmp_path):
    folder = tmp_path / "classifier"
    saved_checkpoint(minilm, folder, seed=3)
    digest = checkpoint_digest(folder)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert digest == "sha256:" + hashlib.sha256((folder / CHECKPOINT_FILE).read_bytes()).hexdigest()
    assert checkpoint_digest(folder / CHECKPOINT_FILE) == digest
    assert load_classifier(folder).digest == digest
    saved_checkpoint(minilm, tmp_path / "same", seed=3)
    assert checkpoint_digest(tmp_path / "same") == digest  # saving is deterministic: the same classifier, the same name
    saved_checkpoint(minilm, folder, seed=4)
    assert checkpoint_digest(folder) != digest
    with pytest.raises(KvbenchError, match="no task classifier at"):
        checkpoint_digest(tmp_path / "nothing")


def test_checkpoint_is_replaced_in_one_step(minilm, tmp_path, monkeypatch):
    """Tensors and metadata live in one file swapped in by one os.replace: a writer killed at any point leaves
    the old checkpoint whole (a new one would be whole too), never new tensors beside old metadata."""
    import kvbench.classifier.checkpoint as checkpoint_module

    folder = tmp_path / "classifier"
    saved_checkpoint(minilm, folder, seed=3)
    old_digest = checkpoint_digest(folder)
    (folder / LEGACY_METADATA_FILE).write_text("{}")  # a stale file of format 1
    replaced = []

    def killed_before_the_swap(source, target):
        replaced.append((source, target))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_the_swap)
    with pytest.raises(KeyboardInterrupt):
        saved_checkpoint(minilm, folder, seed=4)
    assert len(replaced) == 1 and replaced[0][1] == folder / CHECKPOINT_FILE
    assert checkpoint_digest(folder) == old_digest
    assert sorted(path.name for path in folder.iterdir()) == sorted([CHECKPOINT_FILE, LEGACY_METADATA_FILE])
    # A kill -9 leaves the partial file behind: it is never read, and the next save replaces the checkpoint.
    (folder / f".{CHECKPOINT_FILE}.12345.partial").write_bytes(b"half a checkpoint")
    load_classifier(folder)
    monkeypatch.undo()
    saved_checkpoint(minilm, folder, seed=4)
    assert checkpoint_digest(folder) != old_digest
    assert not (folder / LEGACY_METADATA_FILE).exists()
    load_classifier(folder)


def test_missing_or_old_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(KvbenchError) as error:
        load_classifier(tmp_path / "nothing")
    assert str(error.value) == (f"no task classifier at {tmp_path / 'nothing'}: run `kvbench train-classifier "
                                "--data-dir DIR` (DIR: LongBench <task>.jsonl files; without it LongBench comes from "
                                "the hub) or pass --task-type qa|other")
    old = tmp_path / "old"
    old.mkdir()
    (old / LEGACY_METADATA_FILE).write_text("{}")
    with pytest.raises(KvbenchError, match="older format.*retrain"):
        load_classifier(old)
    save_file({"linear.weight": torch.zeros(2, 384)}, old / CHECKPOINT_FILE)
    with pytest.raises(KvbenchError, match="older format.*retrain"):
        load_classifier(old)


def rewrite_checkpoint(folder, metadata_text: str | None = None, **changes):
    """Rewrite the checkpoint with its metadata edited (a value None drops the field), or replaced by raw text."""
    file = folder / CHECKPOINT_FILE
    metadata = read_metadata(folder) if metadata_text is None else None
    tensors = load_file(file)
    if metadata is not None:
        for key, value in changes.items():
            if value is None:
                del metadata[key]
            else:
                metadata[key] = value
        metadata_text = json.dumps(metadata)
    save_file(tensors, file, metadata={METADATA_KEY: metadata_text})


def edit_tensors(folder, edit):
    file = folder / CHECKPOINT_FILE
    with safe_open(file, "pt") as opened:
        metadata = opened.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)


def test_corrupt_or_mismatched_checkpoints_fail_in_one_line(minilm, tmp_path):
    folder = tmp_path / "classifier"
    saved_checkpoint(minilm, folder)
    file = folder / CHECKPOINT_FILE
    original = file.read_bytes()
    reader = PromptReader().to_metadata()

    def fails(match):
        with pytest.raises(KvbenchError, match=match) as error:
            load_classifier(folder)
        assert "\n" not in str(error.value)
        file.write_bytes(original)

    rewrite_checkpoint(folder, "{not json")
    fails("classifier metadata is not valid JSON")
    rewrite_checkpoint(folder, "[1, 2]")
    fails("classifier metadata must be a JSON object")
    save_file(load_file(file), file)
    fails("a safetensors file without kvbench classifier metadata")
    rewrite_checkpoint(folder, pooling=None)
    fails(r"lacks field\(s\) pooling")
    rewrite_checkpoint(folder, format_version=1)
    fails("version 1, expected 'kvbench-task-classifier' version 2; retrain")
    rewrite_checkpoint(folder, format_version=2.0)
    fails("version 2.0, expected")
    rewrite_checkpoint(folder, labels=["other", "qa"])
    fails("labels")
    rewrite_checkpoint(folder, pooling=7)
    fails(r"pooling must be one of pooler, first-token, got 7 \(integer\)")
    rewrite_checkpoint(folder, encoder=str(tmp_path / "no-such-encoder"))
    fails("cannot load encoder")
    rewrite_checkpoint(folder, encoder=["all-MiniLM-L6-v2"])
    fails(r"encoder must be a non-empty string, got \[\"all-MiniLM-L6-v2\"\] \(array\)")
    rewrite_checkpoint(folder, hidden_size=768)
    fails("trained on hidden size 768")
    rewrite_checkpoint(folder, hidden_size="384")
    fails(r"hidden_size must be a positive integer, got \"384\" \(string\)")
    rewrite_checkpoint(folder, hidden_size=True)
    fails(r"hidden_size must be a positive integer, got true \(boolean\)")
    rewrite_checkpoint(folder, training="lots")
    fails(r"training must be an object")
    rewrite_checkpoint(folder, reader={**reader, "head_tokens": "32"})
    fails("reader head_tokens must be an integer >= 0, got '32'")
    rewrite_checkpoint(folder, reader=None)
    fails(r"lacks field\(s\) reader")
    file.write_bytes(b"garbage")
    fails("not a readable safetensors file")
    file.write_bytes(original[:len(original) // 2])
    fails("not a readable safetensors file")
    file.write_bytes((10 ** 9).to_bytes(8, "little") + original[8:])
    fails("not a readable safetensors file \\(header of 1000000000 bytes in a file of")
    file.unlink()
    fails("no task classifier at")
    edit_tensors(folder, lambda tensors: tensors.pop("linear.weight"))
    fails("lacks 1 tensor.*linear.weight")
    edit_tensors(folder, lambda tensors: tensors.update({"linear.weight": torch.zeros(3, 384)}))
    fails(r"linear.weight has shape \[3, 384\].*expects \[2, 384\]")
    edit_tensors(folder, lambda tensors: tensors.update({"linear.weight": torch.zeros(2, 384, dtype=torch.float16)}))
    fails(r"linear.weight is float16.*expects float32")
    edit_tensors(folder, lambda tensors: tensors.update({"encoder.pooler.dense.bias": torch.zeros(384)}))
    fails("does not train, e.g. encoder.pooler.dense.bias")
    load_classifier(folder)  # restored: loads again


# -- command line, settings, progress output ---------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["--data-dir", "{tmp}/absent"], "--data-dir {tmp}/absent: no such folder"),
    (["--data-dir", "{tmp}/empty"], "--data-dir {tmp}/empty: no <task>.jsonl file of the requested LongBench tasks"),
    (["--data-dir", "{tmp}/data", "--tasks", "qasper,nope"], "--tasks: nope not LongBench task(s)"),
    (["--data-dir", "{tmp}/data", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--data-dir", "{tmp}/data", "--held-out-fraction", "1.5"], "--held-out-fraction must be between 0 and 1, got 1.5"),
    (["--data-dir", "{tmp}/data", "--held-out-tasks", "lcc"], "--held-out-tasks 'lcc': expected"),
    (["--data-dir", "{tmp}/data", "--tasks", "qasper"], "the data holds only one kind of task"),
    (["--data-dir", "{tmp}/data", "--device", "tpu"], "--device 'tpu' is not usable on this machine; usable: cpu"),
    (["--data-dir", "{tmp}/absent", "--device", "cuda:99"], "--device 'cuda:99' is not usable on this machine"),
])
def test_train_classifier_bad_input_is_one_line_and_exit_2(tmp_path, arguments, message):
    (tmp_path / "empty").mkdir()
    write_task(tmp_path / "data", "qasper", [sample("a"), sample("b")])
    write_task(tmp_path / "data", "trec", [sample("c"), sample("d")])
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    result = CliRunner().invoke(main, ["train-classifier", *arguments, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message.format(tmp=tmp_path)}")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_device_is_checked_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    TrainingConfig(device="cpu").validate()
    for device in ("cuda", "cuda:0", "mps", "tpu", "CPU", ""):
        with pytest.raises(KvbenchError, match=f"^--device '{device}' is not usable on this machine; usable: cpu$"):
            TrainingConfig(device=device).validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for device in ("cuda", "cuda:0", "cuda:1", "mps"):
        TrainingConfig(device=device).validate()
    with pytest.raises(KvbenchError, match="'cuda:2' is not usable on this machine; usable: cpu, cuda, cuda:0, cuda:1, mps"):
        TrainingConfig(device="cuda:2").validate()


def test_prompt_weights_weigh_each_label_alike_and_with_task_balance_each_task_within_its_label():
    # label 0: task a (3 prompts) and task b (1); label 1: task c (2); six prompts weigh 6 in all
    cached = CachedPrompts(states=[], labels=[0, 0, 0, 0, 1, 1], tasks=["a", "a", "a", "b", "c", "c"],
                           few_shot=[False] * 6)
    assert prompt_weights(cached, range(6), "task") == {0: 0.5, 1: 0.5, 2: 0.5, 3: 1.5, 4: 1.5, 5: 1.5}
    assert prompt_weights(cached, range(6), "label") == {0: 0.75, 1: 0.75, 2: 0.75, 3: 0.75, 4: 1.5, 5: 1.5}


def test_few_shot_prompts_are_left_out_of_fitting_unless_asked(tmp_path, monkeypatch):
    encoder = tiny_local_encoder(tmp_path / "encoder", tiny_bert_config(), pooler_bias=0.0)
    few_shot = "Question: A?\nType: Date\nQuestion: B?\nType: Reason\nQuestion: C?\nType:"
    prompts = [LabelledPrompt(task, f"{task}{index}", f"Read this, {task} {index}. Why?\nAnswer:", label)
               for task, label in (("qasper", 0), ("hotpotqa", 0), ("gov_report", 1)) for index in range(5)]
    prompts += [LabelledPrompt("trec", f"trec{index}", f"Classify {index}.\n{few_shot}", 1) for index in range(5)]
    fitted = []
    monkeypatch.setattr(train, "fit", lambda model, cached, indices, *args, **kwargs: fitted.append(list(indices)))
    for train_on_few_shot in (False, True):
        fitted.clear()
        config = TrainingConfig(encoder=encoder, epochs=1, held_out_tasks="none", train_on_few_shot=train_on_few_shot)
        train.train_classifier(prompts, config, report=lambda line: None)
        (indices,) = fitted
        assert any(prompts[index].task == "trec" for index in indices) is train_on_few_shot


def test_reader_settings_of_training_are_checked():
    with pytest.raises(KvbenchError, match="reader head_tokens must be an integer >= 0, got -1"):
        TrainingConfig(reader=PromptReader(head_tokens=-1)).validate()
    with pytest.raises(KvbenchError, match="balance must be one of task, label"):
        TrainingConfig(balance="prompt").validate()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert progress_bars_enabled() is True
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert progress_bars_enabled() is False
    monkeypatch.setattr(sys, "stderr", object())  # no isatty at all
    assert progress_bars_enabled() is False


@pytest.mark.parametrize("quieted", [True, False])
def test_other_libraries_bars_are_off_when_the_command_line_is_piped(quieted):
    """What the command line does first (`KvbenchGroup.main`): a bar drawn by plain tqdm (as transformers' GGUF
    reader draws it), transformers' and datasets' switches all off when stderr is a pipe; without it, the bar
    shows, so the check can fail."""
    script = "\n".join([
        "import os",
        "from kvbench.console import quiet_third_party_progress_bars",
        *(["quiet_third_party_progress_bars()"] if quieted else []),
        "from tqdm.auto import tqdm",
        "for _ in tqdm(range(3), desc='third-party bar'): pass",
        "from transformers.utils import logging",
        "print(logging.is_progress_bar_enabled(), os.environ.get('HF_DATASETS_DISABLE_PROGRESS_BARS'))",
    ])
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    if quieted:
        assert "third-party bar" not in result.stderr
        assert result.stdout.split() == ["False", "1"]
    else:
        assert "third-party bar" in result.stderr


def test_piped_training_log_has_only_the_report_lines(tmp_path):
    """A tiny random encoder trained end to end through the CLI, stderr piped: one line per report, no bars."""
    encoder = tiny_local_encoder(tmp_path / "encoder", tiny_bert_config(), pooler_bias=0.0)
    for task in ("qasper", "hotpotqa", "gov_report", "multi_news"):
        write_task(tmp_path / "data", task, [sample(f"{task}{index}", f"Text {index}.", "Why?") for index in range(4)])
    out = tmp_path / "classifier"
    result = CliRunner().invoke(main, ["train-classifier", "--data-dir", str(tmp_path / "data"), "--encoder", encoder,
                                       "--epochs", "2", "--held-out-tasks", "all", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "%|" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"encoder {encoder} (first-token features), reading paragraphs")
    assert [line.split()[:3] for line in lines[1:]] == [["held-out", "task", task]
                                                        for task in ("qasper", "hotpotqa", "gov_report", "multi_news")]
    assert read_metadata(out)["reader"] == PromptReader().to_metadata()
    load_classifier(out).predict("Question: why?\nAnswer:")


# -- real training --------------------------------------------------------------------------------

#: tasks held out one at a time in the real training run: the two Chinese QA tasks, a few-shot task that reads
#: like QA, and English multi-doc QA (the ones the reference's head-and-tail reading got wrong)
HELD_OUT = ("multifieldqa_zh", "dureader", "triviaqa", "hotpotqa")


@pytest.fixture(scope="module")
def trained_on_longbench_mini(tmp_path_factory):
    """One real training run on longbench-mini through the CLI: (CliRunner result, checkpoint folder)."""
    from conftest import LONGBENCH_MINI

    if not LONGBENCH_MINI.is_dir():
        pytest.skip(f"{LONGBENCH_MINI} not present")
    out = tmp_path_factory.mktemp("trained") / "classifier"
    result = CliRunner().invoke(main, ["train-classifier", "--data-dir", str(LONGBENCH_MINI),
                                       "--held-out-tasks", ",".join(HELD_OUT), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return result, out


@pytest.mark.slow
def test_training_on_longbench_mini_beats_chance_on_held_out_prompts(trained_on_longbench_mini, longbench_mini):
    """MiniLM, 10 epochs on 80% of longbench-mini (237 prompts, 21 tasks), 4 tasks also held out whole; about
    a minute on 2 CPU cores.

    32 of the 47 held-out prompts are "other", so always answering it would score
    0.68 (balanced 0.5). The held-out prompts are re-scored here through the saved
    checkpoint, i.e. the full encoder as at inference, not the training-time cache.
    """
    result, out = trained_on_longbench_mini
    summary = read_metadata(out)["training"]
    assert summary["held_out"]["accuracy"] >= 0.85
    assert summary["held_out"]["balanced_accuracy"] >= 0.85
    assert "held-out-task accuracy" in result.output

    prompts = load_labelled_prompts([longbench_mini])
    _, held_out = split_held_out(prompts, 0.2, seed=0)
    classifier = load_classifier(out)
    predictions = classifier.predict_batch([prompts[index].text for index in held_out])
    accuracy = sum(LABELS[prompts[index].label] == label for index, label in zip(held_out, predictions)) / len(held_out)
    assert accuracy >= 0.85


@pytest.mark.slow
def test_leave_one_task_out_generalises_to_unseen_tasks(trained_on_longbench_mini):
    """Each of HELD_OUT scored by a model trained without it: Chinese QA is not "Chinese means other" any more,
    and triviaqa's demonstrations make it "other" although its question reads like QA."""
    _, out = trained_on_longbench_mini
    accuracy = read_metadata(out)["training"]["held_out_tasks"]["accuracy_per_task"]
    assert list(accuracy) == list(HELD_OUT)
    assert accuracy["triviaqa"] == 1.0
    assert accuracy["multifieldqa_zh"] >= 0.8
    assert accuracy["dureader"] >= 0.8
    assert accuracy["hotpotqa"] >= 0.8
