"""The Triton kernel under Triton's CPU interpreter; prints its errors as one JSON line.

Run by test_attention_mass.py as ``TRITON_INTERPRET=1 python tests/interpret_attention_mass.py``
(the variable must be set before triton is imported, hence a separate process).
"""

import json

import torch
import triton
import triton.language as tl
from test_attention_mass import dense_attention_mass, random_inputs, relative_error, tolerance_for
from triton_interpreter import widen_bfloat16_in_dots

from kvbench.methods.attention_mass_triton import Blocks, _round_to_bfloat16, fused_attention_mass

# (Hq, Hkv, L, head_dim, dtype, Blocks): lengths that are multiples of no tile; query tiles larger and
# smaller than key tiles in each pass; a head_dim that is not a power of two (80, padded to 128).
CASES = [
    (4, 2, 37, 16, torch.float32, Blocks(32, 16, 4, 16, 32, 4)),
    (4, 1, 100, 64, torch.float32, Blocks(32, 16, 4, 32, 16, 4)),
    (2, 2, 70, 128, torch.float32, Blocks(64, 32, 4, 64, 32, 4)),
    (4, 2, 77, 80, torch.float16, Blocks(16, 16, 4, 16, 16, 4)),
    (6, 2, 50, 128, torch.bfloat16, Blocks(32, 32, 4, 16, 64, 4)),
    (8, 2, 61, 64, torch.bfloat16, Blocks(32, 16, 4, 64, 16, 4)),
]


@triton.jit
def _round_values(values, rounded, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    tl.store(rounded + offsets, _round_to_bfloat16(tl.load(values + offsets, mask=inside)), mask=inside)


def bfloat16_rounding_mismatches() -> int:
    """How many values the kernel's integer bfloat16 rounding maps otherwise than torch's float32 -> bfloat16."""
    # Ties (low half 0x8000) with even and odd kept bits, carries into the exponent, zero, subnormals,
    # the largest finite float (rounds to infinity, as in torch), both signs; then random bit patterns.
    patterns = [0x3F808000, 0x3F818000, 0x3F7F8000, 0x3FFFFFFF, 0x00000000, 0x00008000, 0x00018000, 0x7F7FFFFF]
    magnitudes = torch.cat([
        torch.tensor(patterns, dtype=torch.int32),
        torch.randint(0, 0x7F800000, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int32),
    ])
    sign = torch.tensor(-(2**31), dtype=torch.int32)
    values = torch.cat([magnitudes, magnitudes | sign]).view(torch.float32)
    rounded = torch.empty_like(values)
    _round_values[(triton.cdiv(values.numel(), 1024),)](values, rounded, values.numel(), BLOCK=1024)
    expected = values.to(torch.bfloat16).float()
    return int((rounded.view(torch.int32) != expected.view(torch.int32)).sum())


def relative_errors() -> list:
    """[case, relative error against the dense attention matrix, its bound] for each case and both variants."""
    widen_bfloat16_in_dots()
    errors = []
    for num_query_heads, num_kv_heads, length, head_dim, dtype, blocks in CASES:
        queries, keys = random_inputs(num_query_heads, num_kv_heads, length, head_dim, dtype)
        # Strided like the model's queries, (1, L, Hq, d) transposed, so the kernel's stride handling is exercised.
        queries = queries.transpose(1, 2).contiguous().transpose(1, 2)
        for per_kv_head in (False, True):
            scores = fused_attention_mass(queries, keys, head_dim**-0.5, per_kv_head, blocks)
            expected = dense_attention_mass(queries, keys, head_dim**-0.5, per_kv_head)
            assert scores.shape == expected.shape
            case = f"Hq {num_query_heads} Hkv {num_kv_heads} L {length} d {head_dim} {dtype} {blocks}"
            case += f" per_kv_head {per_kv_head}"
            errors.append([case, relative_error(scores, expected), tolerance_for(queries, keys, head_dim**-0.5)])
    return errors


if __name__ == "__main__":
    outcome = {"bfloat16 rounding mismatches": bfloat16_rounding_mismatches(), "relative errors": relative_errors()}
    print(json.dumps(outcome))
