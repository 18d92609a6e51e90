"""Attention mass (kvbench.methods.importance): both paths against the dense eager attention matrix.

The chunked PyTorch path runs everywhere. The Triton kernel runs under Triton's CPU interpreter
(tests/interpret_attention_mass.py, in a subprocess since TRITON_INTERPRET must be set before triton is
imported; skipped where triton is not installed) and on CUDA (skipped without a GPU).
Timings: tests/gpu/attention_mass.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kvbench.methods.base import LayerPrefill
from kvbench.methods.importance import attention_importance, attention_mass, chunked_attention_mass, rank_middle

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def dense_attention_mass(queries, keys, scaling, per_kv_head=False):
    """The column sums of the model's eager attention matrix, float64 after the logits.

    Logits as eager attention makes them: repeat_kv, matmul and scale in the inputs' dtype (float32
    inputs: in float64, the exact value the float32 paths approximate).
    """
    num_query_heads, length = queries.shape[1], queries.shape[2]
    num_kv_heads = keys.shape[1]
    groups = num_query_heads // num_kv_heads
    repeated = keys.repeat_interleave(groups, dim=1)
    if queries.dtype == torch.float32:
        logits = queries.double() @ repeated.double().transpose(-1, -2) * scaling
    else:
        logits = (queries @ repeated.transpose(-1, -2) * scaling).double()
    future = torch.ones(length, length, dtype=torch.bool, device=queries.device).triu(1)
    columns = logits.masked_fill(future, float("-inf")).softmax(-1)[0].sum(dim=-2)  # (Hq, L)
    if per_kv_head:
        return columns.view(num_kv_heads, groups, length).mean(dim=1)
    return columns.mean(dim=0)


def relative_error(scores, expected):
    return ((scores.double() - expected).abs() / expected.abs()).max().item()


#: unit roundoff of float32, the precision of every path's arithmetic after the logits
FLOAT32_ROUNDOFF = 2.0**-24


def float32_mass_tolerance(num_query_heads, length, max_abs_logit):
    """Relative error bound of a float32 attention mass whose logits equal the reference's (derived, not observed).

    Each probability exp(logit - lse) errs relatively by the roundings of the logit's scaling into base 2
    (|logit| units), of the exponential (a few units) and of the log-sum-exp's sum of <= length terms; a
    column then sums <= num_query_heads * length positive terms, in whatever order, each adding at most
    one rounding. A wrong mask, log-sum-exp or scaling errs by far more (>= 1e-3 at these lengths).
    """
    roundings = 4 * max_abs_logit + 2 * length + num_query_heads * length + 16
    return roundings * FLOAT32_ROUNDOFF


def tolerance_for(queries, keys, scaling):
    logits = queries.double() @ keys.double().repeat_interleave(queries.shape[1] // keys.shape[1], 1).mT * scaling
    return float32_mass_tolerance(queries.shape[1], queries.shape[2], logits.abs().max().item())


def random_inputs(num_query_heads, num_kv_heads, length, head_dim, dtype, device="cpu", seed=0):
    """Queries and keys whose dot products are exact in float32, so every path's logits are the same numbers.

    Entries are multiples of 1/4 in [-4, 4] (exact in bfloat16 and float16): each product is a multiple
    of 1/16 below 16 in size, and any partial sum over head_dim <= 256 terms needs at most 4 + 8 + 4 = 16
    significant bits, within float32's 24. So a dot product accumulated in float32 is exact in any order,
    and its rounding to a 16-bit dtype is the same on every CPU, BLAS kernel and tile shape; with
    Gaussian inputs the summation order (OpenBLAS's kernel for this CPU, the chunk's shape) decides
    which of two neighbouring 16-bit values a near-tie logit rounds to. Entries spread over [-4, 4]
    give peaked attention rows, so the scores are far from uniform.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    queries = torch.randint(-16, 17, (1, num_query_heads, length, head_dim), generator=generator, device=device)
    keys = torch.randint(-16, 17, (1, num_kv_heads, length, head_dim), generator=generator, device=device)
    return (queries / 4).to(dtype), (keys / 4).to(dtype)


# -- the chunked PyTorch path ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize(
    "num_query_heads, num_kv_heads, length, head_dim",
    [(8, 2, 70, 64), (4, 4, 37, 128), (6, 1, 57, 80), (2, 1, 1, 16)],  # GQA, MHA, MQA, one token
)
def test_chunked_path_equals_the_dense_attention_matrix(
    num_query_heads, num_kv_heads, length, head_dim, per_kv_head, dtype
):
    # Low-precision inputs too meet the float32 bound: the logits are the eager ones (scaled after the
    # matmul, in the input dtype), so only float32 arithmetic after them differs. Scaling the queries
    # first, as this path once did, misses by ~3e-2 in bf16 whenever the scaling is not a power of two.
    queries, keys = random_inputs(num_query_heads, num_kv_heads, length, head_dim, dtype)
    scaling = head_dim**-0.5
    expected = dense_attention_mass(queries, keys, scaling, per_kv_head)
    tolerance = tolerance_for(queries, keys, scaling)
    for chunk_bytes in (1, 5000, 10**9):  # one row per chunk, a few rows, one chunk
        scores = chunked_attention_mass(queries, keys, scaling, per_kv_head, chunk_bytes)
        assert scores.dtype == torch.float32 and scores.shape == expected.shape
        assert relative_error(scores, expected) <= tolerance
        # Every query row distributes a mass of 1 over the keys.
        torch.testing.assert_close(scores.sum(dim=-1), torch.full(scores.shape[:-1], float(length)))


def test_cpu_tensors_take_the_chunked_path_and_importance_is_the_head_average():
    queries, keys = random_inputs(8, 2, 45, 32, torch.float32)
    average = attention_mass(queries, keys, 0.3)
    torch.testing.assert_close(average, chunked_attention_mass(queries, keys, 0.3), rtol=0, atol=0)
    per_kv_head = attention_mass(queries, keys, 0.3, per_kv_head=True)
    torch.testing.assert_close(per_kv_head, chunked_attention_mass(queries, keys, 0.3, True), rtol=0, atol=0)
    layer = LayerPrefill(0, 1, queries, keys, keys, 0.3)
    torch.testing.assert_close(attention_importance(layer), per_kv_head.mean(dim=0))


# -- the Triton kernel under the CPU interpreter ------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests run the kernel itself (and Triton "
                    "releases before 3.9 interpret bf16 dots differently)")
def test_triton_kernel_under_the_interpreter_equals_the_dense_attention_matrix():
    script = os.path.join(os.path.dirname(__file__), "interpret_attention_mass.py")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, script], env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["bfloat16 rounding mismatches"] == 0
    errors = outcome["relative errors"]
    assert len(errors) == 12
    # bfloat16 and float16 too: the kernel's logits are the eager ones (exact dot products, same roundings).
    assert all(error <= tolerance for _, error, tolerance in errors), errors


# -- the Triton kernel on CUDA ------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@cuda_only
@pytest.mark.parametrize(
    "num_query_heads, num_kv_heads, length, head_dim",
    [(8, 2, 1000, 128), (4, 4, 777, 64), (8, 1, 1, 128), (6, 2, 333, 80)],
)
def test_cuda_kernel_equals_the_dense_attention_matrix_in_float32(num_query_heads, num_kv_heads, length, head_dim):
    from kvbench.methods.attention_mass_triton import fused_attention_mass

    queries, keys = random_inputs(num_query_heads, num_kv_heads, length, head_dim, torch.float32, "cuda")
    for per_kv_head in (False, True):
        scores = attention_mass(queries, keys, head_dim**-0.5, per_kv_head)
        fused = fused_attention_mass(queries, keys, head_dim**-0.5, per_kv_head)
        torch.testing.assert_close(scores, fused, rtol=0, atol=0)
        expected = dense_attention_mass(queries, keys, head_dim**-0.5, per_kv_head)
        assert relative_error(scores, expected) <= tolerance_for(queries, keys, head_dim**-0.5)


def kept_jaccard(fused, chunked, keep):
    """Jaccard of the two paths' top-`keep` sets, ranked as PrefixKV and Elastic rank."""
    fused_kept = set(rank_middle(fused, 0, 0)[:keep].tolist())
    chunked_kept = set(rank_middle(chunked, 0, 0)[:keep].tolist())
    return len(fused_kept & chunked_kept) / len(fused_kept | chunked_kept)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_keeps_the_chunked_paths_tokens_in_low_precision(dtype):
    # The kernel's and cuBLAS's dot products sum in different orders, so now and then (~1e-4 of the
    # logits) one rounds to the neighbouring 16-bit value, moving that probability by up to a few percent:
    # a late token, attended by few queries, can move that much; the average cannot, and kept sets
    # differ at most by a near tie at the cut. (Scaling at the wrong place errs by ~1e-2 everywhere.)
    generator = torch.Generator(device="cuda").manual_seed(0)
    # Gaussian, not exact, inputs: this test is about those near-tie roundings.
    queries = (2 * torch.randn(1, 32, 4099, 128, generator=generator, device="cuda")).to(dtype)
    keys = (2 * torch.randn(1, 8, 4099, 128, generator=generator, device="cuda")).to(dtype)
    fused = attention_mass(queries, keys, 128**-0.5, per_kv_head=True)
    chunked = chunked_attention_mass(queries, keys, 128**-0.5, per_kv_head=True)
    errors = (fused.double() - chunked.double()).abs() / chunked.double()
    report = [f"{dtype}: relative error max {errors.max().item():.2e} mean {errors.mean().item():.2e}"]
    assert errors.mean().item() <= 1e-4 and errors.max().item() <= 0.25, report
    rows = [(f"kv head {head}", fused[head], chunked[head]) for head in range(fused.shape[0])]
    rows.append(("head average", fused.mean(dim=0), chunked.mean(dim=0)))
    for name, fused_scores, chunked_scores in rows:
        for keep in (410, 2050):
            jaccard = kept_jaccard(fused_scores, chunked_scores, keep)
            report.append(f"{name} keep {keep}: Jaccard {jaccard:.4f}")
            assert jaccard >= 0.98, report
    print("; ".join(report))
