"""Batch-invariant decoding (kvbench.engine.invariant): its kernels against PyTorch, the invariance itself, and
how a run turns it on and records it.

The kernels and the decode mode run under Triton's CPU interpreter here (tests/interpret_batch_invariant.py,
in a subprocess since TRITON_INTERPRET must be set before triton is imported) and on CUDA (skipped without a
GPU); both run the checks of tests/batch_invariant_checks.py, whose docstring says how the tolerances follow
from the kernels' arithmetic. GPU timings and the 8B-shaped model: tests/gpu/invariance.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from kvbench.cli import main
from kvbench.engine import invariant
from kvbench.engine.invariant import invariance_gap, invariant_forwards, resolve_batch_invariant
from kvbench.errors import KvbenchError
from kvbench.harness.model import ModelDescription
from kvbench.harness.run import RunPlan, open_run, run_benchmark
from kvbench.methods import build_method
from kvbench.tasks import build_tasks
from tests.tiny_models import FAMILIES, tiny_loaded_model, tiny_model

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def interpret(part: str) -> dict:
    script = os.path.join(os.path.dirname(__file__), "interpret_batch_invariant.py")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, script, part], env=environment, capture_output=True, text=True,
                            timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_kernels_hold(outcome: dict) -> None:
    for kernel, checks in outcome.items():
        assert max(checks["excess"].values()) <= 1, (kernel, checks["excess"])
        assert all(checks["invariant"].values()), (kernel, checks["invariant"])
    assert len(outcome["attention"]["excess"]) == 9 and len(outcome["linear"]["excess"]) == 6
    assert len(outcome["linear"]["invariant"]) == 9  # and a batch of LARGE_TILES' size in each dtype


def assert_engine_invariant(outcome: dict, logits_recorded: bool) -> None:
    for method in ("fullkv", "elastic"):
        checks = outcome[method]
        assert checks["samples decoded"] == checks["samples"] > 0, (method, checks)  # in every batch size
        assert checks["tokens identical"], (method, checks)
        assert checks["first token as the plain path's"], (method, checks)
        assert checks["forwards restored"], (method, checks)
        if logits_recorded:
            assert checks["steps recorded"] > 0 and checks["logits identical"], (method, checks)
    assert all(outcome["prefill rms norm"].values()), outcome["prefill rms norm"]
    grid = outcome["grid"]
    assert grid["configurations in one step"] == 2 and grid["tokens identical"], grid
    if logits_recorded:
        assert grid["logits identical"], grid


# -- the kernels and the mode under the CPU interpreter -----------------------------------------------

interpreter_only = pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on a GPU the CUDA tests "
                                      "run the kernels themselves")


@pytest.mark.slow
@interpreter_only
def test_kernels_under_the_interpreter_match_pytorch_and_are_batch_invariant():
    assert_kernels_hold(interpret("kernels"))


@pytest.mark.slow
@interpreter_only
def test_decoding_under_the_interpreter_gives_each_sample_the_same_logits_in_any_batch():
    assert_engine_invariant(interpret("engine"), logits_recorded=True)


# -- on CUDA ---------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@cuda_only
def test_cuda_kernels_match_pytorch_and_are_batch_invariant():
    from tests.batch_invariant_checks import kernel_checks

    assert_kernels_hold(kernel_checks("cuda"))


@cuda_only
@pytest.mark.parametrize("use_cuda_graphs", [False, True], ids=["eager", "cuda-graph"])
def test_cuda_decoding_gives_each_sample_the_same_tokens_in_any_batch(use_cuda_graphs):
    from tests.batch_invariant_checks import engine_checks
    from tests.method_helpers import recording_graph_captures

    with recording_graph_captures() as captured:
        outcome = engine_checks("cuda", use_cuda_graphs)
    # replayed graphs do not call decode_logits, so logits are recorded eagerly only
    assert_engine_invariant(outcome, logits_recorded=not use_cuda_graphs)
    assert bool(captured) == use_cuda_graphs


def test_large_batches_take_the_large_tiles_only_on_cuda_where_they_give_the_same_bits(monkeypatch):
    kernels = pytest.importorskip("kvbench.engine.invariant_kernels")
    first = kernels.LARGE_TILES_FROM_ROWS
    assert kernels.tiles_for(4 * first, torch.empty(4, 4)) == kernels.LINEAR_TILES  # not on the CPU

    class CudaWeight:
        is_cuda, device, dtype = True, torch.device("cuda", 0), torch.bfloat16

    monkeypatch.setattr(kernels, "_large_tiles_agree", lambda device, dtype: True)
    assert kernels.tiles_for(first, CudaWeight) == kernels.LARGE_TILES
    assert kernels.tiles_for(first - 1, CudaWeight) == kernels.LINEAR_TILES
    monkeypatch.setattr(kernels, "_large_tiles_agree", lambda device, dtype: False)  # other bits, or no room
    assert kernels.tiles_for(4 * first, CudaWeight) == kernels.LINEAR_TILES


# -- the mode's switch, scope and record (plain PyTorch) ---------------------------------------------


def test_the_default_is_on_for_cuda_and_supported_families_only(monkeypatch):
    monkeypatch.setattr(invariant, "BATCH_INVARIANT_ON_CUDA", True)
    assert resolve_batch_invariant(None, "cuda", "llama") and resolve_batch_invariant(None, "cuda:1", "qwen2")
    assert not resolve_batch_invariant(None, "cpu", "llama")
    assert not resolve_batch_invariant(None, "cuda", "gemma")
    assert not resolve_batch_invariant(False, "cuda", "llama")
    monkeypatch.setattr(invariant, "BATCH_INVARIANT_ON_CUDA", False)
    assert not resolve_batch_invariant(None, "cuda", "llama") and resolve_batch_invariant(True, "cuda", "llama")
    with pytest.raises(KvbenchError, match="needs a CUDA device"):
        resolve_batch_invariant(True, "cpu", "llama")
    with pytest.raises(KvbenchError, match="not 'gemma'"):
        resolve_batch_invariant(True, "cuda", "gemma")


def test_asking_for_it_on_the_cpu_is_one_line_before_the_model_loads(tmp_path):
    result = CliRunner().invoke(main, ["run", "--method", "fullkv", "--tasks", "trec", "--device", "cpu",
                                       "--batch-invariant", "--output", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--batch-invariant needs a CUDA device" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_supported_families_have_a_kernel_for_every_module_with_weights(family):
    assert invariance_gap(tiny_model(family, num_layers=1)) is None


def test_a_module_without_a_kernel_is_named():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
    assert invariance_gap(model) == "modules LayerNorm have no batch-invariant kernel"


def test_the_forwards_are_swapped_inside_the_block_only():
    model = tiny_model("qwen2", num_layers=2)  # Qwen2's projections have biases
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    norms = [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]
    assert len(linears) == 2 * 7 + 1 and len(norms) == 2 * 2 + 1
    model.model.norm.forward = wrapped = lambda hidden_states: hidden_states  # as chunked prefills wrap norms
    with invariant_forwards(model):
        assert all("forward" in module.__dict__ for module in linears + norms)
        assert model.model.norm.forward is not wrapped
    assert not any("forward" in module.__dict__ for module in linears + norms[:-1])
    assert model.model.norm.forward is wrapped


def test_the_prefill_norms_swap_only_the_rms_norms_and_only_on_cuda():
    from kvbench.engine.invariant import kernel_rms_norms
    from kvbench.engine.prefill import prefill_kernels

    model = tiny_model("qwen2", num_layers=2)
    norms = [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * 2 + 1
    with kernel_rms_norms(model):
        assert all("forward" in module.__dict__ for module in norms)
        assert not any("forward" in module.__dict__ for module in model.modules() if type(module) is torch.nn.Linear)
    assert not any("forward" in module.__dict__ for module in norms)
    assert prefill_kernels(model)["prefill_rms_norm"] == "model"  # on the CPU the model's own norms


def test_the_mode_is_part_of_the_identity_and_cpu_identities_are_unchanged(tmp_path, longbench_mini):
    loaded = tiny_loaded_model("llama", num_layers=2)
    method = build_method("snapkv", capacity=32)
    plain = RunPlan(tasks=build_tasks("trec"), data_dir=str(longbench_mini), limit=1, max_length=160,
                    output_dir=tmp_path)
    summary = run_benchmark(loaded, method, plain)
    recorded = json.loads((summary.run_dir / "run.json").read_text())
    assert recorded["batch_invariant"] is False
    assert recorded["prefill_rms_norm"] == recorded["prefill_elementwise"] == "model"
    assert "batch_invariant" not in recorded["identity"]  # as before the mode existed
    invariant_plan = RunPlan(**{**plain.__dict__, "batch_invariant": True})
    with pytest.raises(KvbenchError, match="batch_invariant: null -> true"):
        open_run(ModelDescription.of(loaded), method, method.prepare(loaded.info), invariant_plan)
