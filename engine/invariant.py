"""Batch-invariant decoding: a sample's tokens do not depend on the batch it is decoded in.

In the decode step every reduction a row's logits go through is done by a kernel of
`kvbench.engine.invariant_kernels`, whose order is fixed by the row alone: the linear layers
(``nn.Linear``: attention projections, MLP, the LM head), the RMSNorms, and attention over the
row's valid slots (the hook, `kvbench.engine.hook`). The rest of the step is already
invariant: embedding lookups, rotary embeddings (one product per element), the SiLU and the
residual sums are elementwise, and the greedy argmax compares exactly (ties go to the first index).

The mode is scoped to the decode step: `invariant_forwards` swaps the modules' forwards for the
step's forward pass only and puts them back after, so a prefill (one sample, batch 1 already) gives the
first token and the cache it gives today. Only the model families whose modules it knows are
supported (`invariance_gap` names what it does not know). It needs Triton's kernels on a CUDA device.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from kvbench.errors import KvbenchError

#: the default of `kvbench run` / `bench` on CUDA: on if a batch-invariant decode step costs at most 1.3x the
#: fast one at batch 32 and at --batch-size auto (`tests/gpu/measure.sh invariance` measures it)
BATCH_INVARIANT_ON_CUDA = True
#: model types whose decoder layers are made of nn.Linear, the RMSNorm below, and elementwise operations
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

_MISSING = object()


def check_batch_invariant_device(requested: bool | None, device: str) -> None:
    """--batch-invariant refused off CUDA: checked before the model's config is read (a GGUF model converts then)."""
    if requested and not device.startswith("cuda"):
        raise KvbenchError("--batch-invariant needs a CUDA device (its kernels are Triton's); "
                           "CPU decoding takes the plain path")


def resolve_batch_invariant(requested: bool | None, device: str, model_type: str | None) -> bool:
    """Whether to decode batch-invariantly: as asked (refused in one line where it cannot run), else the default
    (on for CUDA and a supported family, see `BATCH_INVARIANT_ON_CUDA`)."""
    cuda = device.startswith("cuda")
    supported = model_type in SUPPORTED_MODEL_TYPES
    if requested is None:
        return BATCH_INVARIANT_ON_CUDA and cuda and supported
    check_batch_invariant_device(requested, device)
    if requested and not supported:
        raise KvbenchError(f"--batch-invariant supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}, "
                           f"not {model_type!r}; pass --no-batch-invariant")
    return requested


@functools.cache
def family_classes(suffix: str) -> tuple[type, ...]:
    """The supported families' module classes named ``<Family><suffix>`` (``RMSNorm``, ``MLP``) that this
    transformers has."""
    classes = []
    for model_type, prefix in SUPPORTED_MODEL_TYPES.items():
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:  # an older transformers without the family
            continue
        found = getattr(module, f"{prefix}{suffix}", None)
        if found is not None:
            classes.append(found)
    return tuple(classes)


def _linear_forward(module: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    from kvbench.engine.invariant_kernels import invariant_linear

    return invariant_linear(input, module.weight, module.bias)


def _rms_norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from kvbench.engine.invariant_kernels import invariant_rms_norm

    return invariant_rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _invariant_forward(module: torch.nn.Module):
    """The batch-invariant forward of a module that computes a reduction, None for one that needs none, and
    False for one this mode does not know."""
    if type(module) is torch.nn.Linear:  # not a subclass: a quantised linear computes otherwise
        return functools.partial(_linear_forward, module)
    if isinstance(module, family_classes("RMSNorm")):  # all: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
        return functools.partial(_rms_norm_forward, module)
    if isinstance(module, torch.nn.Embedding) or next(module.parameters(recurse=False), None) is None:
        return None
    return False


def invariance_gap(model) -> str | None:
    """Why ``model`` cannot decode batch-invariantly (the modules with weights this mode does not know), or None."""
    unknown = sorted({type(module).__name__ for module in model.modules() if _invariant_forward(module) is False})
    return f"modules {', '.join(unknown)} have no batch-invariant kernel" if unknown else None


def check_invariance(model) -> None:
    gap = invariance_gap(model)
    if gap is not None:
        raise KvbenchError(f"--batch-invariant: {gap}; pass --no-batch-invariant")


def own_forward_attribute(module: torch.nn.Module) -> str:
    """The attribute holding the module's own forward: an accelerate hook (--device-map) keeps it as
    ``_old_forward`` and wraps it in ``forward``."""
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def found_once(model, cache_attribute: str, find):
    """``find(model)``, a walk over the model's modules, run once per model and kept in ``cache_attribute``: the
    prefill asks for the same modules every sample."""
    found = getattr(model, cache_attribute, None)
    if found is None:
        found = find(model)
        setattr(model, cache_attribute, found)
    return found


def _replacements(model, cache_attribute: str, forward_of) -> list[tuple[torch.nn.Module, str, object]]:
    """(module, attribute, forward) for every module ``forward_of`` gives a forward, found once per model (kept in
    ``cache_attribute``), each at `own_forward_attribute`."""
    return found_once(model, cache_attribute, lambda model: [
        (module, own_forward_attribute(module), forward) for module in model.modules()
        if (forward := forward_of(module))])


@contextlib.contextmanager
def swapped_forwards(replacements: list[tuple[torch.nn.Module, str, object]]):
    """Within the block, each module's ``attribute`` is the given forward; what it was is put back after."""
    swapped = []
    try:
        for module, attribute, forward in replacements:
            swapped.append((module, attribute, module.__dict__.get(attribute, _MISSING)))
            setattr(module, attribute, forward)
        yield
    finally:
        for module, attribute, previous in reversed(swapped):
            if previous is _MISSING:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)


def invariant_forwards(model):
    """Within the block, every linear layer and RMSNorm of ``model`` runs its batch-invariant kernel."""
    return swapped_forwards(_replacements(model, "_kvbench_invariant_forwards", _invariant_forward))


def _rms_norm_only(module: torch.nn.Module):
    return functools.partial(_rms_norm_forward, module) if isinstance(module, family_classes("RMSNorm")) else None


def has_kernel_rms_norms(model) -> bool:
    """Whether ``model`` has RMSNorms `kernel_rms_norms` runs by the kernel (those of the supported families)."""
    return bool(_replacements(model, "_kvbench_kernel_rms_norms", _rms_norm_only))


def kernel_rms_norms(model):
    """Within the block, every RMSNorm of the supported families runs `invariant_rms_norm`: one pass over the
    hidden states where the module's own forward makes eight (a float32 copy, its square, the mean, the product,
    the rounding, the weight), each reading and writing the whole tensor. Same arithmetic, the mean of squares
    summed in another order (tests/test_batch_invariant.py bounds the difference)."""
    return swapped_forwards(_replacements(model, "_kvbench_kernel_rms_norms", _rms_norm_only))
