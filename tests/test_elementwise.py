"""The prefill's elementwise kernels (kvbench.engine.elementwise) against the model's code, and their swap.

The kernels run under Triton's CPU interpreter here (this file as a script, in a subprocess, since
TRITON_INTERPRET must be set before triton is imported) and on CUDA (skipped without a GPU). Each product of two
bfloat16 numbers is exact in float32, so rounding it and the sum once each, as the rotary kernel does, is what
PyTorch's bfloat16 arithmetic does: the comparison counts differing elements and expects none. The SiLU gate is
exact on CUDA too (libdevice's exp and an IEEE division, as PyTorch's CUDA SiLU); the interpreter has no
libdevice and takes tl.exp, a float32 unit or two off, which may round the SiLU one unit of the dtype away (a
relative eps) and the product with it: eps from the SiLU plus half an eps from the product's rounding, so there
the check allows two units of the dtype.
"""

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.bfloat16, torch.float16)


def _differing(result: torch.Tensor, expected: torch.Tensor) -> int:
    return int((result != expected).sum())


def _beyond_two_units(result: torch.Tensor, expected: torch.Tensor) -> int:
    unit = torch.finfo(expected.dtype).eps * expected.float().abs().clamp_min(torch.finfo(expected.dtype).tiny)
    return int(((result.float() - expected.float()).abs() > 2 * unit).sum())


def elementwise_outcome(device: str) -> dict:
    """Per case, how many elements of each kernel's result differ from the model's code (the SiLU gate on the
    interpreter: by more than two units); and whether it refuses what it should."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kvbench.engine.elementwise import (_kernel_mlp_forward, rotary_applies, rotate_in_place, silu_gate_applies,
                                            silu_times_in_place)

    exact_silu = device != "cpu"
    outcome = {}
    generator = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)  # as in the prefill: the kernels refuse inputs that autograd may need
    for dtype in DTYPES:
        for batch, heads, positions, head_dim in ((1, 4, 37, 64), (2, 3, 70, 128)) if dtype == torch.bfloat16 else ():
            config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=4096)
            rotary = LlamaRotaryEmbedding(config).to(device)
            # as the attention modules hand them over: projections viewed as (batch, heads, positions, head dim)
            projected = (4 * torch.randn(batch, positions, heads * head_dim, generator=generator)).to(device, dtype)
            x = projected.view(batch, positions, heads, head_dim).transpose(1, 2)
            position_ids = torch.arange(1000, 1000 + positions, device=device).expand(batch, positions)
            cos, sin = rotary(x, position_ids)
            expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
            assert rotary_applies(x, cos, 1)
            result = rotate_in_place(x, cos, sin)
            outcome[f"rotary {dtype} {tuple(x.shape)}"] = _differing(result, expected) if result is x else -1
        gate = (4 * torch.randn(3, 77, 300, generator=generator)).to(device, dtype)
        up = torch.randn(3, 77, 300, generator=generator).to(device, dtype)
        expected = torch.nn.functional.silu(gate) * up
        assert silu_gate_applies(gate, up)
        result = silu_times_in_place(gate, up)
        count = (_differing if exact_silu else _beyond_two_units)(result, expected)
        outcome[f"silu gate {dtype}"] = count if result is gate else -1
        mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=160)).to(device, dtype)
        hidden = torch.randn(1, 50, 64, generator=generator).to(device, dtype)
        if exact_silu:
            outcome[f"mlp {dtype}"] = _differing(_kernel_mlp_forward(mlp, hidden), mlp(hidden))
    fp32 = torch.zeros(1, 2, 8, 64, device=device)
    refused = [rotary_applies(fp32, torch.zeros(1, 8, 64, device=device), 1),
               rotary_applies(fp32.to(torch.bfloat16)[..., :48], torch.zeros(1, 8, 48, device=device,
                                                                             dtype=torch.bfloat16), 1),
               silu_gate_applies(fp32, fp32), silu_gate_applies(fp32.half().transpose(1, 2), fp32.half().transpose(1, 2))]
    torch.set_grad_enabled(True)
    half = fp32.half()
    refused += [rotary_applies(half, torch.zeros(1, 8, 64, device=device, dtype=torch.float16), 1),  # float16
                rotary_applies(half.bfloat16(), torch.zeros(1, 8, 64, device=device, dtype=torch.bfloat16), 1),
                silu_gate_applies(half, half)]
    outcome["refused"] = 0 if not any(refused) else 1
    return outcome


def assert_exact(outcome: dict, cases: int) -> None:
    assert len(outcome) == cases and not any(outcome.values()), outcome


def interpret(part: str) -> dict:
    """This file's ``part`` under Triton's CPU interpreter, in a subprocess; its outcome."""
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__, part], env=environment, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on a GPU the CUDA test runs the kernels")
def test_the_kernels_under_the_interpreter_give_the_models_results():
    assert_exact(interpret("kernels"), 2 + 2 + 1)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_the_cuda_kernels_give_the_models_bits():
    assert_exact(elementwise_outcome("cuda"), 2 + 2 + 2 + 1)


def prefill_outcome(device: str, gate: bool) -> dict:
    """A bfloat16 SnapKV prefill of a tiny Llama with the elementwise kernels (the SiLU gate's only if ``gate``)
    against one with the model's code: kept values that differ, and whether the first token is the same. The
    RMSNorm stays the model's (its kernel rounds otherwise, within a tolerance)."""
    from unittest import mock

    from batch_invariant_checks import tiny_snapkv_prefill  # tests/ is on the path under pytest and as a script

    from kvbench.engine import elementwise
    from kvbench.engine import prefill as prefill_module
    from kvbench.engine.prefill import prefill_shared

    model, compressor, request = tiny_snapkv_prefill(device, torch.bfloat16)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(prefill_module, "_kernel_norms_apply", return_value=False))
        if not gate:
            stack.enter_context(mock.patch.object(elementwise, "silu_gate_applies", return_value=False))
        with mock.patch.object(prefill_module, "_kernel_elementwise_applies", return_value=False):
            own = prefill_shared(model, [compressor], request)[0]
        with mock.patch.object(prefill_module, "_kernel_elementwise_applies", return_value=True):
            kernels = prefill_shared(model, [compressor], request)[0]
    differing = sum(_differing(theirs, mine) for layer_own, layer_kernels in zip(own.kept, kernels.kept)
                    for mine, theirs in zip(layer_own, layer_kernels))
    return {"kept values differing": differing, "first token differs": int(kernels.first_token != own.first_token)}


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on a GPU the CUDA test runs the kernels")
def test_a_prefill_with_the_rotary_kernel_under_the_interpreter_keeps_the_models_cache_bit_for_bit():
    assert_exact(interpret("prefill"), 2)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_a_cuda_prefill_with_the_kernels_keeps_the_models_cache_bit_for_bit():
    assert_exact(prefill_outcome("cuda", gate=True), 2)


def test_the_kernels_are_swapped_inside_the_block_only_for_the_supported_families():
    from transformers.models.llama import modeling_llama

    from kvbench.engine.chunked import install_chunking
    from kvbench.engine.elementwise import kernel_elementwise, kernel_elementwise_parts
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", num_layers=2)
    install_chunking(model, 16)
    mlps = [layer.mlp for layer in model.model.layers]
    rotary_before, forwards_before = modeling_llama.apply_rotary_pos_emb, [mlp.forward for mlp in mlps]
    with kernel_elementwise(model):
        assert modeling_llama.apply_rotary_pos_emb is not rotary_before
        assert all(mlp.forward is not before for mlp, before in zip(mlps, forwards_before))
        assert all(mlp.forward.args[1] == 16 for mlp in mlps)  # still chunked, at the model's chunk length
    assert modeling_llama.apply_rotary_pos_emb is rotary_before
    assert [mlp.forward for mlp in mlps] == forwards_before
    with kernel_elementwise(model):  # the modules found once, kept on the model: the same swaps again
        assert modeling_llama.apply_rotary_pos_emb is not rotary_before
        assert all(mlp.forward is not before for mlp, before in zip(mlps, forwards_before))
    assert modeling_llama.apply_rotary_pos_emb is rotary_before
    copy.deepcopy(model)  # what is kept on the model leaves it copyable (no module object among it)
    assert kernel_elementwise_parts(model) == []  # float32: the model's code
    assert kernel_elementwise_parts(model.to(torch.float16)) == ["silu gate"]
    assert kernel_elementwise_parts(model.to(torch.bfloat16)) == ["rotary", "silu gate"]
    assert kernel_elementwise_parts(torch.nn.Sequential(torch.nn.Embedding(2, 2))) == []


if __name__ == "__main__":  # under TRITON_INTERPRET=1, from `interpret`
    from triton_interpreter import round_bfloat16_casts_to_nearest

    round_bfloat16_casts_to_nearest()
    part = sys.argv[1]
    print(json.dumps(elementwise_outcome("cpu") if part == "kernels" else prefill_outcome("cpu", gate=False)))
