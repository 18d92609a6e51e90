"""The prefill's rotary embedding in one kernel, giving the model's own bits.

The supported families rotate queries and keys as ``x * cos + rotate_half(x) * sin`` in the model's dtype: a
negation, a concatenation, two products and a sum, each reading and writing the whole tensor. At 6.5k tokens of
Llama-3-8B on an H100 those kernels took about 8% of the prefill. `rotate_in_place` does it in one pass, in
place, with the same roundings: each product of two 16-bit numbers is exact in float32 and rounded to the dtype,
as PyTorch's 16-bit product is, and so is the sum; so its results are PyTorch's bit for bit (tests/test_rotary.py).
Float32 models keep the model's function (a float32 kernel could fuse a product into the sum, rounding otherwise).

In place is safe for the reason `kvbench.engine.chunked` gives: the attention modules pass freshly projected
queries and keys and use only the rotated ones.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import triton
import triton.language as tl

from kvbench.engine.invariant import SUPPORTED_MODEL_TYPES

#: positions per program (a program rotates one head of these positions)
BLOCK_TOKENS = 32


@triton.jit
def _rotate(X, COS, SIN, tokens, heads, stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
            HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    batch_head = tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    positions = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HALF)
    inside = positions[:, None] < tokens
    x_at = X + batch.to(tl.int64) * stride_xb + head * stride_xh + positions[:, None].to(tl.int64) * stride_xt + dims[None, :]
    angle_at = batch.to(tl.int64) * stride_cb + positions[:, None].to(tl.int64) * stride_ct + dims[None, :]
    dtype = X.dtype.element_ty
    first = tl.load(x_at, mask=inside, other=0.0).to(tl.float32)
    second = tl.load(x_at + HALF, mask=inside, other=0.0).to(tl.float32)
    cos_first = tl.load(COS + angle_at, mask=inside, other=0.0).to(tl.float32)
    cos_second = tl.load(COS + angle_at + HALF, mask=inside, other=0.0).to(tl.float32)
    sin_first = tl.load(SIN + angle_at, mask=inside, other=0.0).to(tl.float32)
    sin_second = tl.load(SIN + angle_at + HALF, mask=inside, other=0.0).to(tl.float32)
    # each product rounded to the dtype, then the sum (rotate_half puts -second first, first second)
    rotated_first = (first * cos_first).to(dtype).to(tl.float32) + (-second * sin_first).to(dtype).to(tl.float32)
    rotated_second = (second * cos_second).to(dtype).to(tl.float32) + (first * sin_second).to(dtype).to(tl.float32)
    tl.store(x_at, rotated_first.to(dtype), mask=inside)
    tl.store(x_at + HALF, rotated_second.to(dtype), mask=inside)


def kernel_applies(x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether `rotate_in_place` takes these: (batch, heads, positions, head dim) in a 16-bit dtype, angles of
    (batch, positions, head dim) in the same dtype, half a head a power of two, no autograd."""
    if unsqueeze_dim != 1 or x.dim() != 4 or cos.dim() != 3 or torch.is_grad_enabled():
        return False
    batch, _, positions, head_dim = x.shape
    half = head_dim // 2
    return (x.dtype in (torch.bfloat16, torch.float16) and cos.dtype == x.dtype and x.stride(-1) == 1
            and cos.stride(-1) == 1 and cos.shape == (batch, positions, head_dim) and head_dim % 2 == 0
            and half >= 16 and half & (half - 1) == 0)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos[:, None] + rotate_half(x) * sin[:, None]`` written over ``x`` (see `kernel_applies`); ``x``."""
    batch, heads, positions, head_dim = x.shape
    sin = sin.expand_as(cos)
    if sin.stride() != cos.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    grid = (triton.cdiv(positions, BLOCK_TOKENS), batch * heads)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rotate[grid](x, cos, sin, positions, heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                      cos.stride(1), HALF=head_dim // 2, BLOCK_T=BLOCK_TOKENS, num_warps=4)
    return x


def _kernel_rotary(original, queries, keys, cos, sin, *args, unsqueeze_dim: int = 1, **kwargs):
    if args or kwargs or not (kernel_applies(queries, cos, unsqueeze_dim) and kernel_applies(keys, cos, unsqueeze_dim)):
        return original(queries, keys, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
    return rotate_in_place(queries, cos, sin), rotate_in_place(keys, cos, sin)


def _modeling_modules(model) -> list:
    """The modeling modules of ``model``'s attention classes that belong to the supported families."""
    families = {f"transformers.models.{model_type}.modeling_{model_type}" for model_type in SUPPORTED_MODEL_TYPES}
    names = {type(module).__module__ for module in model.modules() if type(module).__name__.endswith("Attention")}
    return [sys.modules[name] for name in sorted(names & families)]


def has_kernel_rotary(model) -> bool:
    """Whether `kernel_rotary` changes anything for ``model`` (a supported family's attention)."""
    return any(hasattr(modeling, "apply_rotary_pos_emb") for modeling in _modeling_modules(model))


@contextlib.contextmanager
def kernel_rotary(model):
    """Within the block, the supported families' ``apply_rotary_pos_emb`` rotates 16-bit queries and keys by
    `rotate_in_place` (anything else by what was there: the model's, or `kvbench.engine.chunked`'s)."""
    swapped = []
    try:
        for modeling in _modeling_modules(model):
            previous = getattr(modeling, "apply_rotary_pos_emb", None)
            if previous is None:
                continue
            swapped.append((modeling, previous))

            def rotary(queries, keys, cos, sin, *args, _previous=previous, **kwargs):
                return _kernel_rotary(_previous, queries, keys, cos, sin, *args, **kwargs)

            modeling.apply_rotary_pos_emb = rotary
        yield
    finally:
        for modeling, previous in reversed(swapped):
            modeling.apply_rotary_pos_emb = previous
