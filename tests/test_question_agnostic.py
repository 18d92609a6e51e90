"""Question-agnostic compression: where each task's question begins, the engine's extend step, decode-time
eviction with the question in the cache, and a question-agnostic run that crashes and resumes."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pandas as pd

import pytest
import torch

from kvbench.engine.extend import extend
from kvbench.engine.generate import as_compressor, generate_stream
from kvbench.engine.prefill import DecodeRequest, prefill
from kvbench.errors import KvbenchError
from kvbench.harness.run import RunPlan, run_benchmark, sample_request
from kvbench.methods import build_method
from kvbench.tasks import TASK_FACTORIES, build_tasks
from kvbench.tasks.base import Task, declares_question_part, question_token_start
from kvbench.tasks.longbench import LongBenchTask, fill_template
from kvbench.tasks.longbench_spec import LONGBENCH_TASKS, TASK_TABLE
from kvbench.tasks.needle import NeedleTask
from kvbench.report.load import load_runs
from kvbench.report.tables import question_table, to_markdown
from kvbench.report.write import write_report
from kvbench.runfolder import parse_result_file
from tests.method_helpers import crash_at_row, recording, sample_state
from tests.test_method_contract import CONTRACT, build
from tests.test_report import finished_run
from tests.tiny_models import FAMILIES, byte_tokenizer, random_prompt, tiny_loaded_model, tiny_model

CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONTEXT_MARK = "Zebra paragraphs about the harbour."
QUESTION_MARK = "Which colour was the lighthouse?"

# -- where the question begins ------------------------------------------------------------------

#: how each LongBench template's question part begins, where not with the question itself: the question
#: field's label, or (templates without a question field) the request that follows the document
QUESTION_STARTS = {
    "narrativeqa": "Question: ", "qasper": "Question: ", "multifieldqa_en": "Question: ", "multifieldqa_zh": "问题：",
    "hotpotqa": "Question: ", "2wikimqa": "Question: ", "musique": "Question: ", "dureader": "问题：",
    "gov_report": "Now, write a one-page summary of the report.", "qmsum": "Query: ",
    "multi_news": "Now, write a one-page summary of all the news.", "vcsum": "会议总结：",
    "passage_count": "Please enter the final count of unique paragraphs", "lcc": "Next line of code:",
}


@pytest.fixture(scope="module", params=["plain", "chat"])
def tokenizer(request):
    tokenizer = byte_tokenizer()
    if request.param == "chat":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def longbench_sample(context_sentences: int = 3) -> dict:
    return {"_id": "s1", "context": " ".join([CONTEXT_MARK] * context_sentences), "input": QUESTION_MARK,
            "answers": ["red"], "length": 10}


def test_every_registered_task_declares_its_question_part():
    assert all(declares_question_part(factory()) for factory in TASK_FACTORIES.values())


@pytest.mark.parametrize("name", LONGBENCH_TASKS)
def test_longbench_split_puts_the_question_after_the_boundary_and_the_context_before(name, tokenizer):
    task = LongBenchTask(name)
    sample = longbench_sample()
    request = sample_request(task, sample, tokenizer, 4000, set(), question_agnostic=True)
    context = tokenizer.decode(request.prompt_ids[: request.question_start])
    question = tokenizer.decode(request.prompt_ids[request.question_start :])
    assert CONTEXT_MARK in context and CONTEXT_MARK not in question
    if "{input}" in TASK_TABLE[name].prompt_template:
        assert QUESTION_MARK in question and QUESTION_MARK not in context
    # a byte per token: the question part's ids begin exactly where its text does
    assert question.startswith(QUESTION_STARTS.get(name, QUESTION_MARK))
    text = fill_template(TASK_TABLE[name], sample)
    boundary = len(text) - len(task.question_part(sample))
    # what the method may read is the context alone
    assert request.sample["prompt_text"] == text[:boundary]


def test_longbench_split_after_middle_truncation_and_when_truncation_cuts_the_question(tokenizer):
    task = LongBenchTask("qasper")
    sample = longbench_sample(context_sentences=200)
    request = sample_request(task, sample, tokenizer, 600, set(), question_agnostic=True)
    assert len(request.prompt_ids) <= 600 + 40  # the chat template's few tokens beyond the budget
    assert QUESTION_MARK in tokenizer.decode(request.prompt_ids[request.question_start :])
    assert QUESTION_MARK not in tokenizer.decode(request.prompt_ids[: request.question_start])
    with pytest.raises(KvbenchError, match="truncation cut into it"):
        sample_request(task, sample, tokenizer, 60, set(), question_agnostic=True)


def test_question_aware_requests_have_no_boundary(tokenizer):
    task = LongBenchTask("hotpotqa")
    request = sample_request(task, longbench_sample(), tokenizer, 4000, set())
    assert request.question_start is None and QUESTION_MARK in request.sample["prompt_text"]


def test_question_token_start_refuses_a_question_that_is_the_whole_prompt():
    tokenizer = byte_tokenizer()
    ids = tokenizer("Question: why?", add_special_tokens=False)["input_ids"]
    with pytest.raises(KvbenchError, match="whole prompt"):
        question_token_start(tokenizer, ids, "Question: why?")


def test_a_token_straddling_the_boundary_goes_with_the_question():
    class Merging:
        """Decodes token 0 as "a", 1 as "b", 2 as "cQ" (a token across the boundary), 3 as "uestion"."""
        pieces = ["a", "b", "cQ", "uestion"]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.pieces[i] for i in ids)

    assert question_token_start(Merging(), [0, 1, 2, 3], "Question") == 2


@pytest.fixture
def small_haystack(tmp_path):
    (tmp_path / "a.txt").write_text("Cats sleep a lot. Dogs bark at night, when the moon is up. " * 60)
    return tmp_path


def test_needle_split_is_the_question_and_the_answer_prefix(tokenizer, small_haystack):
    task = NeedleTask(lengths=[600], depths=[50], haystack_dir=small_haystack)
    sample = task.load_samples()[0]
    request = sample_request(task, sample, tokenizer, 10_000, set(), question_agnostic=True)
    context = tokenizer.decode(request.prompt_ids[: request.question_start])
    question = tokenizer.decode(request.prompt_ids[request.question_start :])
    assert question.startswith(f"Question: {task.question}\nAnswer:")
    assert task.needle in context and "Question:" not in context
    assert len(request.prompt_ids) == 600  # the split changes no prompt


# -- the extend step ---------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def reference_extend(model, kept, new_ids, first_position):
    """The decoder written out layer by layer: each new token attends, in float64, to the layer's kept keys
    and values and causally to the new tokens (keys after RoPE at their prompt positions)."""
    inner = model.model
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    count = len(new_ids)
    ids = torch.tensor([new_ids])
    positions = torch.arange(first_position, first_position + count).view(1, -1)
    hidden = inner.embed_tokens(ids)
    cos, sin = (part.unsqueeze(1) for part in inner.rotary_emb(hidden, positions))
    new_cache = []
    for layer, (kept_keys, kept_values) in zip(inner.layers, kept):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query, key, value = (projection(normed).view(1, count, -1, head_dim).transpose(1, 2)
                             for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        new_cache.append((key, value))
        keys = torch.cat([kept_keys, key], dim=2).repeat_interleave(heads // kv_heads, dim=1).double()
        values = torch.cat([kept_values, value], dim=2).repeat_interleave(heads // kv_heads, dim=1).double()
        scores = query.double() @ keys.transpose(-1, -2) * attention.scaling
        kept_length = kept_keys.shape[2]
        allowed = torch.arange(kept_length + count) <= (kept_length + torch.arange(count))[:, None]
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        output = (weights @ values).float().transpose(1, 2).reshape(1, count, heads * head_dim)
        hidden = hidden + attention.o_proj(output)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return new_cache, model.lm_head(inner.norm(hidden))[0, -1]


#: fp32 products and sums over at most a few hundred terms (hidden 64, kept + new < 200 keys) round to
#: about 1e-5 relative; through 4 layers and the output head, 1e-4 of the values' scale bounds it
TOLERANCE = 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method_name", sorted(CONTRACT))
def test_extend_equals_the_decoder_written_out_over_the_kept_cache(family, method_name):
    model = tiny_model(family)
    prompt = random_prompt(150)
    context_length = 136
    method = build(method_name, 48)
    compressor = as_compressor(method, model)
    context = prefill(model, compressor, DecodeRequest(prompt[:context_length], 1, set()))
    with torch.inference_mode():
        extended, logits = extend(model, list(context.kept), prompt[context_length:], context_length)
        expected_cache, expected_logits = reference_extend(model, context.kept, prompt[context_length:],
                                                           context_length)
    for (keys, values), (kept_keys, kept_values), (new_keys, new_values) in zip(extended, context.kept,
                                                                                expected_cache):
        assert torch.equal(keys[:, :, : kept_keys.shape[2]], kept_keys)
        assert torch.equal(values[:, :, : kept_values.shape[2]], kept_values)
        torch.testing.assert_close(keys[:, :, kept_keys.shape[2]:], new_keys, rtol=TOLERANCE, atol=TOLERANCE)
        torch.testing.assert_close(values[:, :, kept_values.shape[2]:], new_values, rtol=TOLERANCE, atol=TOLERANCE)
    scale = expected_logits.abs().max().item()
    torch.testing.assert_close(logits, expected_logits, rtol=TOLERANCE, atol=TOLERANCE * scale)

    # The prefill of a request with a question boundary is that context prefill followed by that extend.
    whole = prefill(model, as_compressor(method, model),
                    DecodeRequest(prompt, 4, set(), question_start=context_length))
    assert whole.kept_per_layer == [keys.shape[2] for keys, _ in extended]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole.kept, extended))
    assert whole.first_token == int(logits.argmax())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_question_agnostic_full_cache_decodes_as_the_whole_prompt(family):
    model = tiny_model(family)
    prompt = random_prompt(90)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    requests = [DecodeRequest(prompt, 10, set(), question_start=start, tag=start) for start in (89, 70, 2)]
    for generation in generate_stream(model, build_method("fullkv"), requests, batch_size=2):
        assert generation.token_ids == expected, generation.tag
        assert generation.kept_per_layer == [90] * 4


def test_question_tokens_stay_whole_in_the_cache():
    model = tiny_model("llama")
    prompt = random_prompt(200)
    request = DecodeRequest(prompt, 1, set(), question_start=180)
    prefilled = prefill(model, as_compressor(build_method("snapkv", capacity=32), model), request)
    assert prefilled.kept_per_layer == [32 + 20] * 4


def test_the_gpu_measurement_runs_on_a_tiny_model(tmp_path):
    """tests/gpu/question_agnostic.py's measurement and table, on CPU, so that it works on its first GPU run."""
    spec = importlib.util.spec_from_file_location("question_agnostic_gpu",
                                                  Path(__file__).parent / "gpu" / "question_agnostic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    specs = ["fullkv", "snapkv", "pyramidkv", "streamingllm"]
    table = script.measure(tiny_model("llama"), specs, [96], 16, 32, 2, say=lambda line: None)
    assert list(table["method"]) == specs
    assert (table["aware_prefill_s"] > 0).all() and (table["agnostic_vs_aware"] > 0).all()
    snapkv = table.set_index("method").loc["snapkv"]
    assert (snapkv["aware_kept_tokens"], snapkv["agnostic_kept_tokens"]) == (32, 32 + 16)
    script.write_table(table, tmp_path, "header")
    assert (tmp_path / "question_agnostic.md").read_text().startswith("header\n\n|")
    assert len(pd.read_csv(tmp_path / "question_agnostic.csv")) == len(specs)


# -- decode-time eviction with the question in the cache -----------------------------------------


@pytest.mark.parametrize("method_name", ["elastic", "prefixkv"])
def test_fixed_point_eviction_counts_the_question_as_kept_prompt(method_name):
    options = {"prefix_config": "online"} if method_name == "prefixkv" else {}
    method = build_method(method_name, capacity=40, **options)
    state = sample_state(method, 100)
    state.kept = [40]  # PrefixKV online learns it in its pre-pass
    assert state.decode_eviction(0, 40, 100) == 40 - 25
    state.prompt_extended(10)
    # the cache is held at its size after the question, the fixed index that size minus 25
    assert state.decode_eviction(0, 49, 110) is None
    assert state.decode_eviction(0, 50, 110) == 50 - 25
    assert state.decode_eviction(0, 50, 130) == 50 - 25
    assert state.record()["budget_per_layer"] == [40]  # the budget is the context's


def test_fixed_point_ratio_eviction_counts_the_question_in_both_lengths():
    state = sample_state(build_method("elastic", ratio=0.5), 100)  # keeps 50 of 100
    state.prompt_extended(10)  # 60 of 110 after the question: the cache grows by 60/110 per token
    assert state.decode_eviction(0, 60, 110) is None
    seen, length, evictions = 110, 60, 0
    for _ in range(110):
        if state.decode_eviction(0, length, seen) is not None:
            length -= 1
            evictions += 1
        length += 1
        seen += 1
    assert length == 120  # held at 60/110 of the 220 tokens seen
    assert evictions == 50


def test_question_agnostic_elastic_decodes_with_the_eviction_schedule():
    model = tiny_model("llama")
    prompt = random_prompt(120)
    compressor = recording(build_method("elastic", capacity=40), 4)
    generation = next(generate_stream(model, compressor, [DecodeRequest(prompt, 6, set(), question_start=110)]))
    assert generation.kept_per_layer == [50] * 4
    assert len(generation.token_ids) == 6
    # the 40 kept context tokens and the 10 question tokens are the held size: before each of the 5 decode
    # steps the cache is 50 long (seen: the whole prompt, then each new token) and evicts its fixed index 50 - 25
    for layer_idx in range(4):
        answers = [answer[1:] for answer in compressor.evictions if answer[0] == layer_idx]
        assert answers == [(50, 120 + step, 25) for step in range(5)]


# -- a question-agnostic run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model("llama", num_layers=2)


def plan(tmp_path, data_dir, question_agnostic=True):
    return RunPlan(tasks=build_tasks("trec,qasper"), data_dir=str(data_dir), limit=3, max_length=600,
                   output_dir=tmp_path / "out", question_agnostic=question_agnostic)


def test_a_question_agnostic_run_resumes_after_a_crash(loaded, tmp_path, longbench_mini):
    method = build_method("snapkv", capacity=32)
    uninterrupted = run_benchmark(loaded, method, plan(tmp_path / "a", longbench_mini))
    assert uninterrupted.run_dir.name == "snapkv-32-question-agnostic"
    recorded = json.loads((uninterrupted.run_dir / "run.json").read_text())
    assert recorded["question_agnostic"] is True and recorded["identity"]["question_agnostic"] is True
    expected = {task: parse_result_file(uninterrupted.run_dir / f"{task}.jsonl")[0] for task in ("trec", "qasper")}
    for rows in expected.values():
        assert all(row["kept_tokens"]["mean"] > 32 for row in rows)  # the question joined the 32 kept

    with crash_at_row(4), pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(loaded, method, plan(tmp_path / "b", longbench_mini))
    resumed = run_benchmark(loaded, method, plan(tmp_path / "b", longbench_mini))
    assert resumed.samples_done == 3
    for task, rows in expected.items():
        got = parse_result_file(resumed.run_dir / f"{task}.jsonl")[0]
        assert [(row["_id"], row["pred"], row["kept_tokens"]) for row in got] == \
               [(row["_id"], row["pred"], row["kept_tokens"]) for row in rows]

    # the question-aware run of the same method fills its own folder
    aware = run_benchmark(loaded, method, plan(tmp_path / "b", longbench_mini, question_agnostic=False))
    assert aware.run_dir.name == "snapkv-32"
    assert "question_agnostic" not in json.loads((aware.run_dir / "run.json").read_text())["identity"]


def test_a_task_without_a_question_part_is_refused_before_any_work(loaded, tmp_path, longbench_mini):
    class NoBoundary(LongBenchTask):
        question_part = Task.question_part

    plain = RunPlan(tasks=[NoBoundary("trec")], data_dir=str(longbench_mini), limit=1, max_length=600,
                    output_dir=tmp_path / "out", question_agnostic=True)
    with pytest.raises(KvbenchError, match="declares no context/question boundary"):
        run_benchmark(loaded, build_method("snapkv", capacity=32), plain)
    assert not (tmp_path / "out").exists()


# -- the report ------------------------------------------------------------------------------------


def question_agnostic_twin(root, method, capacity, scores, **options):
    """A finished run as `kvbench run --question-agnostic` writes it, beside its question-aware twin."""
    folder = f"{method}-{capacity}-question-agnostic"
    run_dir = finished_run(root, method, capacity, scores, folder=folder, **options)
    recorded = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**recorded, "question_agnostic": True}))
    return run_dir


def test_report_shows_question_aware_and_agnostic_side_by_side(tmp_path):
    finished_run(tmp_path, "snapkv", 128, {"qasper": 30.0, "hotpotqa": 40.0})
    question_agnostic_twin(tmp_path, "snapkv", 128, {"qasper": 20.0, "hotpotqa": 45.0})
    finished_run(tmp_path, "fullkv", None, {"qasper": 50.0})  # made one way only: not in the pairs table
    question_agnostic_twin(tmp_path, "pyramidkv", 64, {"qasper": 10.0})  # no question-aware twin either
    frame = load_runs(tmp_path)
    runs = frame.drop_duplicates("run_dir").set_index("run_dir")
    agnostic = runs[runs["question"] == "agnostic"]
    assert sorted(agnostic["settings"]) == ["question-agnostic"] * 2
    assert set(runs[runs["question"] == "aware"]["settings"]) == {""}

    table = question_table(frame)
    assert table.runs[["method", "capacity", "task"]].values.tolist() == [
        ["snapkv", 128, "qasper"], ["snapkv", 128, "hotpotqa"], ["snapkv", 128, "Task avg"]]
    values = [[cell.value for cell in row] for row in table.cells]
    assert values == [[30.0, 20.0, -10.0], [40.0, 45.0, 5.0], [35.0, 32.5, -2.5]]
    assert "| snapkv | 128 | qasper | 30.00 | 20.00 | -10.00 |" in to_markdown(table)

    written = write_report([tmp_path], tmp_path / "report", ["md", "csv"])
    assert tmp_path / "report" / "question.csv" in written
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Question-aware vs question-agnostic" in markdown
    assert "| tiny-model | snapkv | 128 | question-agnostic |" in markdown  # its own leaderboard row


def test_no_pairs_no_question_table(tmp_path):
    finished_run(tmp_path, "snapkv", 128, {"qasper": 30.0})
    question_agnostic_twin(tmp_path, "snapkv", 256, {"qasper": 20.0})
    assert question_table(load_runs(tmp_path)) is None


def test_the_run_command_passes_question_agnostic_to_the_grid(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kvbench.cli import main
    from kvbench.harness import grid

    requests = []
    monkeypatch.setattr(grid, "run_grid", lambda request, **kwargs: requests.append(request))
    for flags in ([], ["--question-agnostic"]):
        result = CliRunner().invoke(main, ["run", "--method", "snapkv", "--capacity", "64", "--tasks", "trec",
                                           "--output", str(tmp_path), *flags])
        assert result.exit_code == 0, result.output
    assert [request.question_agnostic for request in requests] == [False, True]
