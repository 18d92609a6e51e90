"""The prefill's elementwise chains in one kernel each: the rotary embedding and the MLP's SiLU gate.

The supported families rotate queries and keys as ``x * cos + rotate_half(x) * sin`` in the model's dtype (a
negation, a concatenation, two products and a sum, each reading and writing the whole tensor), and gate their
MLP as ``silu(gate) * up`` (two passes over the widest activations of the layer). At 6.5k tokens of Llama-3-8B
on an H100 those kernels took about a tenth of the prefill. Here each is one pass, in place, in float32 with the
model's roundings, so its results are the model's bit for bit (tests/test_elementwise.py): a product of two
bfloat16 numbers is exact in float32 and the rotary kernel rounds it and the sum once each, as PyTorch's bfloat16
arithmetic does (it takes bfloat16 only: float16 and float32 models keep the model's code); the SiLU gate
computes the SiLU as PyTorch's CUDA kernel does (libdevice's exp, an IEEE division) in bfloat16 or float16.

In place is safe for the reason `kvbench.engine.chunked` gives: the attention modules pass freshly projected
queries and keys and use only the rotated ones, and the MLP's gate projection is read only by the product.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import triton
import triton.language as tl

from kvbench.engine.chunked import _chunked_forward
from kvbench.engine.invariant import (SUPPORTED_MODEL_TYPES, family_classes, found_once, own_forward_attribute,
                                     swapped_forwards)
from kvbench.engine.invariant_kernels import _on_device

#: positions per program of the rotary kernel (a program rotates one head of these positions)
BLOCK_TOKENS = 32
#: elements per program of the SiLU gate
BLOCK_ELEMENTS = 2048
#: Triton's CPU interpreter (the tests) has no libdevice: there the SiLU takes tl.exp, within a float32 unit
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_HALF_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _rounded_to_bfloat16(value):
    """``value`` (float32) rounded to the nearest bfloat16, ties to even, kept in float32. In integer arithmetic:
    on an H100 the compiler dropped a float round trip through bfloat16 before a sum (a quarter of the rotated
    values then differed from PyTorch's), which integer operations do not allow."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rotate(X, COS, SIN, tokens, heads, stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
            HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    batch_head = tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    positions = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HALF)
    inside = positions[:, None] < tokens
    x_at = (X + batch.to(tl.int64) * stride_xb + head * stride_xh + positions[:, None].to(tl.int64) * stride_xt
            + dims[None, :])
    angle_at = batch.to(tl.int64) * stride_cb + positions[:, None].to(tl.int64) * stride_ct + dims[None, :]
    first = tl.load(x_at, mask=inside, other=0.0).to(tl.float32)
    second = tl.load(x_at + HALF, mask=inside, other=0.0).to(tl.float32)
    cos_first = tl.load(COS + angle_at, mask=inside, other=0.0).to(tl.float32)
    cos_second = tl.load(COS + angle_at + HALF, mask=inside, other=0.0).to(tl.float32)
    sin_first = tl.load(SIN + angle_at, mask=inside, other=0.0).to(tl.float32)
    sin_second = tl.load(SIN + angle_at + HALF, mask=inside, other=0.0).to(tl.float32)
    # each product rounded to bfloat16, then the sum (rotate_half puts -second first, first second)
    rotated_first = _rounded_to_bfloat16(first * cos_first) + _rounded_to_bfloat16(-second * sin_first)
    rotated_second = _rounded_to_bfloat16(second * cos_second) + _rounded_to_bfloat16(first * sin_second)
    tl.store(x_at, rotated_first.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=inside)
    tl.store(x_at + HALF, rotated_second.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=inside)


@triton.jit
def _silu_times(GATE, UP, count, EXACT_EXP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    gate = tl.load(GATE + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=inside, other=0.0).to(tl.float32)
    if EXACT_EXP:
        exp = tl.extra.libdevice.exp(-gate)
    else:
        exp = tl.exp(-gate)
    dtype = GATE.dtype.element_ty
    silu = tl.math.div_rn(gate, 1.0 + exp).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
    tl.store(GATE + offsets, (silu * up).to(dtype, fp_downcast_rounding="rtne"), mask=inside)


def rotary_applies(x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether `rotate_in_place` takes these: (batch, heads, positions, head dim) in bfloat16, angles of
    (batch, positions, head dim) in bfloat16, half a head a power of two, no autograd."""
    if unsqueeze_dim != 1 or x.dim() != 4 or cos.dim() != 3 or torch.is_grad_enabled():
        return False
    batch, _, positions, head_dim = x.shape
    half = head_dim // 2
    return (x.dtype == torch.bfloat16 and cos.dtype == x.dtype and x.stride(-1) == 1 and cos.stride(-1) == 1
            and cos.shape == (batch, positions, head_dim) and head_dim % 2 == 0 and half >= 16
            and half & (half - 1) == 0)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos[:, None] + rotate_half(x) * sin[:, None]`` written over ``x`` (see `rotary_applies`); ``x``."""
    batch, heads, positions, head_dim = x.shape
    sin = sin.expand_as(cos)
    if sin.stride() != cos.stride():
        sin, cos = sin.contiguous(), cos.contiguous()
    grid = (triton.cdiv(positions, BLOCK_TOKENS), batch * heads)
    with _on_device(x):
        _rotate[grid](x, cos, sin, positions, heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                      cos.stride(1), HALF=head_dim // 2, BLOCK_T=BLOCK_TOKENS, num_warps=4)
    return x


def silu_gate_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `silu_times_in_place` takes these: the same shape, contiguous, one 16-bit dtype, no autograd."""
    return (gate.dtype in _HALF_DTYPES and up.dtype == gate.dtype and gate.shape == up.shape
            and gate.is_contiguous() and up.is_contiguous() and not torch.is_grad_enabled())


def silu_times_in_place(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` written over ``gate`` (see `silu_gate_applies`); ``gate``."""
    count = gate.numel()
    with _on_device(gate):
        _silu_times[(triton.cdiv(count, BLOCK_ELEMENTS),)](gate, up, count, EXACT_EXP=not _INTERPRETED,
                                                          BLOCK=BLOCK_ELEMENTS, num_warps=8)
    return gate


# -- the swaps ----------------------------------------------------------------------------------------


def _kernel_rotary(original, queries, keys, cos, sin, *args, unsqueeze_dim: int = 1, **kwargs):
    if args or kwargs or not (rotary_applies(queries, cos, unsqueeze_dim) and rotary_applies(keys, cos, unsqueeze_dim)):
        return original(queries, keys, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
    return rotate_in_place(queries, cos, sin), rotate_in_place(keys, cos, sin)


def _kernel_mlp_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The supported families' MLP, ``down(silu(gate(x)) * up(x))``, its gate by `silu_times_in_place`."""
    gate, up = module.gate_proj(hidden_states), module.up_proj(hidden_states)
    if silu_gate_applies(gate, up):
        return module.down_proj(silu_times_in_place(gate, up))
    return module.down_proj(module.act_fn(gate) * up)


def _modeling_modules(model) -> list:
    """The modeling modules of ``model``'s attention classes that belong to the supported families."""
    # their names are kept on the model, not the modules: a module object would stop the model being deep-copied
    return [sys.modules[name] for name in found_once(model, "_kvbench_modeling_module_names", _modeling_module_names)]


def _modeling_module_names(model) -> list[str]:
    families = {f"transformers.models.{model_type}.modeling_{model_type}" for model_type in SUPPORTED_MODEL_TYPES}
    names = {type(module).__module__ for module in model.modules() if type(module).__name__.endswith("Attention")}
    return sorted(names & families)


def _silu_mlps(model) -> list[torch.nn.Module]:
    """The supported families' MLPs that gate by SiLU."""
    return found_once(model, "_kvbench_silu_mlps", lambda model: [
        module for module in model.modules() if isinstance(module, family_classes("MLP"))
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")])


def kernel_elementwise_parts(model) -> list[str]:
    """What `kernel_elementwise` runs by its kernels for ``model`` (a supported family in a dtype they take): the
    rotary embedding in bfloat16, the SiLU gate in bfloat16 or float16; none for other models."""
    if not _modeling_modules(model):
        return []
    dtype = model.get_input_embeddings().weight.dtype
    return (["rotary"] if dtype == torch.bfloat16 else []) + (["silu gate"] if dtype in _HALF_DTYPES else [])


@contextlib.contextmanager
def kernel_elementwise(model):
    """Within the block, the supported families' ``apply_rotary_pos_emb`` and SiLU-gated MLPs run the kernels
    above on 16-bit tensors (anything else as before: the model's code, or `kvbench.engine.chunked`'s). An MLP
    keeps its chunking of long prefills; with an accelerate hook (--device-map), its inner forward is swapped."""
    chunk_tokens = getattr(model, "_kvbench_chunk_tokens", None)
    mlp_forwards = []
    for module in _silu_mlps(model):
        attribute = own_forward_attribute(module)
        forward = functools.partial(_kernel_mlp_forward, module)
        if attribute == "forward" and chunk_tokens is not None:  # as `kvbench.engine.chunked` wraps it
            forward = functools.partial(_chunked_forward, forward, chunk_tokens)
        mlp_forwards.append((module, attribute, forward))
    rotaries = []
    try:
        for modeling in _modeling_modules(model):
            previous = getattr(modeling, "apply_rotary_pos_emb", None)
            if previous is not None:
                rotaries.append((modeling, previous))
                modeling.apply_rotary_pos_emb = functools.partial(_kernel_rotary, previous)
        with swapped_forwards(mlp_forwards):
            yield
    finally:
        for modeling, previous in reversed(rotaries):
            modeling.apply_rotary_pos_emb = previous
