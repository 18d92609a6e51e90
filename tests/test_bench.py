"""`kvbench bench`: one table, every method at every length, ratios against the full cache."""

import pandas as pd
import pytest
import torch

from kvbench.harness.bench import parse_method_spec, run_bench, write_bench
from kvbench.harness.model import LoadedModel
from tests.tiny_models import tiny_model


def test_method_specs_carry_options():
    assert parse_method_spec("windowkv:shared_layers=1:task_type=qa") == ("windowkv", {"shared_layers": 1, "task_type": "qa"})
    assert parse_method_spec("snapkv") == ("snapkv", {})


def test_bench_table_has_a_row_per_method_and_length(tmp_path):
    loaded = LoadedModel(model=tiny_model("llama"), tokenizer=None, name="tiny")
    table = run_bench(loaded, ["fullkv", "snapkv", "windowkv:task_type=qa:shared_layers=2"], [96, 160],
                      capacity=32, new_tokens=3, repeats=2, progress=lambda line: None)
    assert len(table) == 6
    full = table[table.method == "fullkv"].set_index("prompt_tokens")
    snap = table[table.method == "snapkv"].set_index("prompt_tokens")
    assert full.kept_tokens_mean.to_dict() == {96: 96, 160: 160}
    assert snap.kept_tokens_mean.to_dict() == {96: 32, 160: 32}
    assert (full.prefill_vs_fullkv == 1).all()
    assert snap.kv_cache_mib.iloc[-1] < full.kv_cache_mib.iloc[-1]
    write_bench(table, tmp_path, "header")
    assert (tmp_path / "bench.md").read_text().startswith("header")
    assert (tmp_path / "bench.csv").is_file()


def test_decode_step_bench_times_each_batch_size(tmp_path):
    from kvbench.harness.bench import run_decode_step_bench

    loaded = LoadedModel(model=tiny_model("llama", num_layers=2), tokenizer=None, name="tiny")
    table = run_decode_step_bench(loaded, [1, 3], cache_tokens=40, steps=4, rounds=2, progress=lambda line: None)
    assert table.batch.tolist() == [1, 3] and (table.steps_timed == 4).all()  # the first round is discarded
    assert (table.step_ms > 0).all() and not table.cuda_graph.any()  # eager on the CPU


@pytest.mark.slow
def test_longbench_workload_runs_every_task_alone_and_batched(longbench_mini):
    from kvbench.harness.bench import LONGBENCH_V1_SAMPLES, run_longbench_workload
    from tests.tiny_models import tiny_loaded_model

    assert sum(LONGBENCH_V1_SAMPLES.values()) == 4750
    loaded = tiny_loaded_model("llama", num_layers=2)
    table, samples = run_longbench_workload(loaded, loaded.tokenizer, ["snapkv"], 32, str(longbench_mini),
                                            batch_size=8, limit=1, alone_limit=1, max_length=120,
                                            progress=lambda line: None)
    alone, batched = table.set_index("mode").loc["batch 1"], table.set_index("mode").loc["batch 8"]
    assert (alone.samples, batched.samples) == (21, 21) and batched.tasks_covered == 21
    assert batched.projected_longbench_v1_hours > 0 and 0 < batched.prefill_share < 1
    assert len(samples) == 21 and samples.identical.all()  # fp32 on the CPU: batched tokens equal batch 1


@pytest.mark.slow
def test_longbench_grid_shares_prefills_and_compares_with_one_by_one(longbench_mini):
    from kvbench.harness.bench import run_longbench_grid
    from tests.tiny_models import tiny_loaded_model

    loaded = tiny_loaded_model("llama", num_layers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table, agreement = run_longbench_grid(loaded, loaded.tokenizer, ["fullkv", "snapkv"], [24, 48],
                                              str(longbench_mini), batch_size=8, limit=1, separate_limit=1,
                                              max_length=120, progress=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    shared = table[table["mode"] == "shared prefill"].set_index("method")
    separate = table[table["mode"] == "one by one"].set_index("method")
    configurations = ["fullkv", "snapkv-24", "snapkv-48"]
    assert list(shared.index) == list(separate.index) == configurations + ["all 3 configurations"]
    assert (shared.loc[configurations, "samples"] == 21).all()
    assert shared.loc["all 3 configurations", "samples"] == 63
    # the shared run's time is split over its configurations by their measured costs
    assert shared.loc[configurations, "seconds"].sum() == pytest.approx(shared.loc["all 3 configurations", "seconds"],
                                                                        abs=0.2)
    assert shared.loc["all 3 configurations", "projected_longbench_v1_hours"] == pytest.approx(
        shared.loc[configurations, "projected_longbench_v1_hours"].sum(), abs=0.005)
    assert shared.loc["all 3 configurations", "prefill_tflops"] >= 0
    assert pd.isna(shared.loc["all 3 configurations", "prefill_mfu"])  # no peak known on the CPU
    # where the decode time went: steps of at most the batch's 8 rows (one lane), no graphs on the CPU
    total = shared.loc["all 3 configurations"]
    assert 0 < total["step_s"] < total["seconds"] and total["captures"] == 0
    assert 1 <= total["rows_per_step"] <= 8 and total["decode_steps"] > 0
    assert len(agreement) == 3 * 21 and agreement.identical.all()  # fp32 on the CPU: the same tokens both ways


def test_a_grid_without_its_one_by_one_run_has_the_shared_rows_only(longbench_mini):
    from kvbench.harness.bench import run_longbench_grid
    from tests.tiny_models import tiny_loaded_model

    loaded = tiny_loaded_model("llama", num_layers=2)
    table, agreement = run_longbench_grid(loaded, loaded.tokenizer, ["snapkv"], [24, 48], str(longbench_mini),
                                          batch_size=8, limit=1, separate_limit=0, max_length=60,
                                          progress=lambda line: None)
    assert set(table["mode"]) == {"shared prefill"} and len(table) == 3 and agreement.empty


def test_prefill_flops_count_weights_per_token_and_half_the_attention_square():
    from kvbench.harness.bench import prefill_flops

    model = tiny_model("llama", num_layers=2, vocab_size=258)
    # per layer: q and o 64x64, k and v 64x32 (2 KV heads of 16), gate, up and down 64x128
    weights = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    # per layer: QK^T and AV over the causal half of 10x10 positions, 4 heads of 16
    attention = 2 * (2 * 2 * 4 * 16 * 10 * 10 / 2)
    assert prefill_flops(model, 10) == 2 * weights * 10 + attention + 2 * 258 * 64


@pytest.mark.parametrize("grid, limit, expected", [([], "0", "--alone-limit must be > 0, got 0"),
                                                   (["--grid"], "-1", "--alone-limit must be >= 0 with --grid, got -1")])
def test_a_bad_alone_limit_is_one_line_before_any_model_loads(tmp_path, grid, limit, expected):
    from click.testing import CliRunner

    from kvbench.cli import main

    result = CliRunner().invoke(main, ["bench", "--workload", "longbench", "--model", "llama3-8b", *grid,
                                       "--methods", "snapkv", "--capacity", "128,256" if grid else "128",
                                       "--data-dir", str(tmp_path), "--alone-limit", limit, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {expected}"]


def test_a_grids_projected_hours_sum_its_configurations_unrounded():
    """29 configurations of 0.0556 h each (one qasper sample of 1 s: 200 of them in LongBench v1) project 1.61 h;
    summing figures rounded to 0.06 h gave 1.74 h (and every grid of ~0.05 h configurations 1.45 h)."""
    from types import SimpleNamespace

    from kvbench.engine.generate import Generation
    from kvbench.harness.bench import _grid_total, workload_row

    sample = Generation(token_ids=[1, 2], prompt_tokens=10, kept_per_layer=[10], prefill_seconds=0.5,
                        prefill_cost_seconds=0.5, decode_seconds=0.5, decode_cost_seconds=0.5, kv_cache_bytes=0,
                        peak_memory_bytes=None, method_record={}, tag=("qasper", "a"))
    compressor = SimpleNamespace(method=SimpleNamespace(budget=128))
    rows = [workload_row(f"configuration {index}", compressor, "shared prefill", 8, [sample], 1.0)
            for index in range(29)]
    assert rows[0]["projected_longbench_v1_hours"] == pytest.approx(200 / 3600, abs=1e-4)
    assert _grid_total(None, "shared prefill", 8, rows, None, 29.0)["projected_longbench_v1_hours"] == 1.61
