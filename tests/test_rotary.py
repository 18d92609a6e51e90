"""The prefill's rotary kernel (kvbench.engine.rotary): the model's own rotation bit for bit, in place.

The kernel runs under Triton's CPU interpreter here (this file as a script, in a subprocess, since
TRITON_INTERPRET must be set before triton is imported) and on CUDA (skipped without a GPU). Each product of two
16-bit numbers is exact in float32, so rounding it and the sum once each, as the kernel does, is what PyTorch's
16-bit arithmetic does: the comparison is exact, not within a tolerance.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def rotary_outcome(device: str) -> dict:
    """Per case, whether `rotate_in_place` gives the model's ``apply_rotary_pos_emb`` bits, in place; and which
    inputs it refuses."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kvbench.engine.rotary import kernel_applies, rotate_in_place

    outcome = {}
    generator = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)  # as in the prefill: the kernel refuses inputs that autograd may need
    for dtype in (torch.bfloat16, torch.float16):
        for batch, heads, positions, head_dim in ((1, 4, 37, 64), (2, 3, 70, 128)):
            config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=4096)
            rotary = LlamaRotaryEmbedding(config).to(device)
            # as the attention modules hand them over: projections viewed as (batch, heads, positions, head dim)
            projected = (4 * torch.randn(batch, positions, heads * head_dim, generator=generator)).to(device, dtype)
            x = projected.view(batch, positions, heads, head_dim).transpose(1, 2)
            position_ids = torch.arange(1000, 1000 + positions, device=device).expand(batch, positions)
            cos, sin = rotary(x, position_ids)
            expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
            applies = kernel_applies(x, cos, 1)
            result = rotate_in_place(x, cos, sin)
            outcome[f"{dtype} {tuple(x.shape)}"] = applies and result is x and torch.equal(result, expected)
    fp32 = torch.zeros(1, 2, 8, 64, device=device)
    outcome["float32 refused"] = not kernel_applies(fp32, torch.zeros(1, 8, 64, device=device), 1)
    outcome["odd half refused"] = not kernel_applies(fp32.to(torch.bfloat16)[..., :48],
                                                     torch.zeros(1, 8, 48, device=device, dtype=torch.bfloat16), 1)
    outcome["autograd refused"] = torch.enable_grad()(kernel_applies)(x, cos, 1) is False
    torch.set_grad_enabled(True)
    return outcome


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on a GPU the CUDA test runs the kernel itself")
def test_the_kernel_under_the_interpreter_gives_the_models_bits():
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__], env=environment, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcome) == 7 and all(outcome.values()), outcome


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_the_cuda_kernel_gives_the_models_bits():
    outcome = rotary_outcome("cuda")
    assert len(outcome) == 7 and all(outcome.values()), outcome


def test_the_rotary_is_swapped_inside_the_block_only_for_the_supported_families():
    from transformers.models.llama import modeling_llama

    from kvbench.engine.rotary import has_kernel_rotary, kernel_rotary
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", num_layers=1)
    before = modeling_llama.apply_rotary_pos_emb
    with kernel_rotary(model):
        assert modeling_llama.apply_rotary_pos_emb is not before
    assert modeling_llama.apply_rotary_pos_emb is before
    assert has_kernel_rotary(model)
    assert not has_kernel_rotary(torch.nn.Sequential(torch.nn.Linear(2, 2)))


if __name__ == "__main__":  # under TRITON_INTERPRET=1, from the test above
    from triton_interpreter import round_bfloat16_casts_to_nearest

    round_bfloat16_casts_to_nearest()
    print(json.dumps(rotary_outcome("cpu")))
