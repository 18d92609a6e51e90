"""`kvbench bench`: one table, every method at every length, ratios against the full cache."""

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
