"""WindowKV's task classifier: truncation, labels, data, checkpoints, the CLI, and one real training run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, GPT2Config

from kvbench.classifier import default_checkpoint_path, load_classifier, save_checkpoint
from kvbench.classifier.checkpoint import METADATA_FILE, TENSORS_FILE
from kvbench.classifier.data import (LabelledPrompt, choose_held_out_tasks, label_of_category, load_labelled_prompts,
                                     split_held_out)
from kvbench.classifier.model import (EMBEDDED_ENCODER, LABELS, MAX_LENGTH, TaskClassifierModel, encoder_source,
                                      head_and_tail_ids, load_encoder, pad_batch)
from kvbench.classifier.train import first_token_last_layer
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


# -- truncation, labels -------------------------------------------------------------------------


def test_head_and_tail_keeps_first_and_last_256_tokens_with_special_tokens(minilm):
    tokenizer = minilm[0]
    text = " ".join(f"word{index}" for index in range(2000))
    full = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    assert len(full) > MAX_LENGTH
    kept = head_and_tail_ids(tokenizer, text)
    assert kept == full[:256] + full[-256:]
    assert (kept[0], kept[-1]) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    short = "a short prompt"
    assert head_and_tail_ids(tokenizer, short) == tokenizer(short)["input_ids"]
    # An odd limit gives the tail the extra token.
    assert head_and_tail_ids(tokenizer, text, max_length=11) == full[:5] + full[-6:]


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
    save_checkpoint(model, trained, MAX_LENGTH, {}, tmp_path / "classifier")
    loaded = load_classifier(tmp_path / "classifier")
    assert loaded.model.pooling == "pooler"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids, attention_mask), model(input_ids, attention_mask))


def test_non_bert_encoder_is_refused_in_one_line(tmp_path):
    folder = tiny_local_encoder(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(KvbenchError, match="encoder of type 'gpt2' is not BERT-style"):
        TaskClassifierModel(load_encoder(folder)[1], "first-token")


def saved_checkpoint(minilm, folder):
    """A checkpoint with a seeded random head and a perturbed last layer, as training would leave them."""
    torch.manual_seed(3)
    model = TaskClassifierModel(load_encoder(EMBEDDED_ENCODER)[1], "first-token")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in model.trained_parameter_names():
                parameter.add_(torch.randn_like(parameter) * 0.01)
    save_checkpoint(model, EMBEDDED_ENCODER, MAX_LENGTH, {"note": "test"}, folder)
    return model.eval()


def test_checkpoint_round_trip_gives_the_same_predictions(minilm, tmp_path, monkeypatch):
    model = saved_checkpoint(minilm, tmp_path / "classifier")
    monkeypatch.setenv("KVBENCH_HOME", str(tmp_path))
    assert default_checkpoint_path() == tmp_path / "classifier"
    loaded = load_classifier()
    prompts = [fill_template(TASK_TABLE["qasper"], sample("a", "A long article. " * 400)),
               fill_template(TASK_TABLE["lcc"], sample("b", "def f():\n    return 1\n"))]
    tokenizer = minilm[0]
    input_ids, attention_mask = pad_batch(tokenizer, [head_and_tail_ids(tokenizer, text) for text in prompts])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids, attention_mask), model(input_ids, attention_mask))
        expected = [LABELS[index] for index in model(input_ids, attention_mask).argmax(dim=1).tolist()]
    assert loaded.predict_batch(prompts) == expected
    assert loaded.predict(prompts[1]) == expected[1]


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(KvbenchError) as error:
        load_classifier(tmp_path / "nothing")
    assert str(error.value) == (f"no task classifier at {tmp_path / 'nothing'}: "
                                "run `kvbench train-classifier` or pass --task-type qa|other")


def edit_metadata(folder, **changes):
    metadata = json.loads((folder / METADATA_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    (folder / METADATA_FILE).write_text(json.dumps(metadata))


def edit_tensors(folder, edit):
    tensors = load_file(folder / TENSORS_FILE)
    edit(tensors)
    save_file(tensors, folder / TENSORS_FILE)


def test_corrupt_or_mismatched_checkpoints_fail_in_one_line(minilm, tmp_path):
    folder = tmp_path / "classifier"
    saved_checkpoint(minilm, folder)
    original_metadata = (folder / METADATA_FILE).read_text()
    original_tensors = (folder / TENSORS_FILE).read_bytes()

    def fails(match):
        with pytest.raises(KvbenchError, match=match) as error:
            load_classifier(folder)
        assert "\n" not in str(error.value)
        (folder / METADATA_FILE).write_text(original_metadata)
        (folder / TENSORS_FILE).write_bytes(original_tensors)

    (folder / METADATA_FILE).write_text("{not json")
    fails("not valid JSON")
    edit_metadata(folder, pooling=None)
    fails(r"lacks field\(s\) pooling")
    edit_metadata(folder, labels=["other", "qa"])
    fails("labels")
    edit_metadata(folder, encoder=str(tmp_path / "no-such-encoder"))
    fails("cannot load encoder")
    edit_metadata(folder, hidden_size=768)
    fails("trained on hidden size 768")
    (folder / TENSORS_FILE).write_bytes(b"garbage")
    fails("not a readable safetensors file")
    (folder / TENSORS_FILE).unlink()
    fails("no such file")
    edit_tensors(folder, lambda tensors: tensors.pop("linear.weight"))
    fails("lacks 1 tensor.*linear.weight")
    edit_tensors(folder, lambda tensors: tensors.update({"linear.weight": torch.zeros(3, 384)}))
    fails(r"linear.weight has shape \[3, 384\].*expects \[2, 384\]")
    edit_tensors(folder, lambda tensors: tensors.update({"encoder.pooler.dense.bias": torch.zeros(384)}))
    fails("does not train, e.g. encoder.pooler.dense.bias")
    load_classifier(folder)  # restored: loads again


# -- command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["--data-dir", "{tmp}/absent"], "--data-dir {tmp}/absent: no such folder"),
    (["--data-dir", "{tmp}/empty"], "--data-dir {tmp}/empty: no <task>.jsonl file of the requested LongBench tasks"),
    (["--data-dir", "{tmp}/data", "--tasks", "qasper,nope"], "--tasks: nope not LongBench task(s)"),
    (["--data-dir", "{tmp}/data", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--data-dir", "{tmp}/data", "--held-out-fraction", "1.5"], "--held-out-fraction must be between 0 and 1, got 1.5"),
    (["--data-dir", "{tmp}/data", "--held-out-tasks", "lcc"], "--held-out-tasks 'lcc': expected"),
    (["--data-dir", "{tmp}/data", "--tasks", "qasper"], "the data holds only one kind of task"),
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


# -- real training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_longbench_mini_beats_chance_on_held_out_prompts(longbench_mini, tmp_path):
    """MiniLM, 10 epochs on 80% of longbench-mini (237 prompts, 21 tasks); about 1 min on 2 CPU cores.

    32 of the 47 held-out prompts are "other", so always answering it would score
    0.68 (balanced 0.5); the trained model scored 0.894 (balanced 0.886) when this
    test was written. The held-out prompts are re-scored here through the saved
    checkpoint, i.e. the full encoder as at inference, not the training-time cache.
    """
    out = tmp_path / "classifier"
    result = CliRunner().invoke(main, ["train-classifier", "--data-dir", str(longbench_mini), "--held-out-tasks", "trec",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / METADATA_FILE).read_text())["training"]
    assert summary["held_out"]["accuracy"] >= 0.8
    assert summary["held_out"]["balanced_accuracy"] >= 0.75
    assert list(summary["held_out_tasks"]["accuracy_per_task"]) == ["trec"]
    assert "held-out-task accuracy" in result.output

    prompts = load_labelled_prompts([longbench_mini])
    _, held_out = split_held_out(prompts, 0.2, seed=0)
    classifier = load_classifier(out)
    predictions = classifier.predict_batch([prompts[index].text for index in held_out])
    accuracy = sum(LABELS[prompts[index].label] == label for index, label in zip(held_out, predictions)) / len(held_out)
    assert accuracy >= 0.8
