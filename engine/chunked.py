"""A lower prefill peak: the decoder layers' per-token work runs over the sequence in chunks, in place where it can.

During a long prefill the peak memory is set by activations, not by the cache: at 128k
tokens Llama-3-8B's MLP holds gate, up, their product and the activation, each
128k x 14336 values, each RMSNorm makes float32 copies of the hidden states, and the
rotary embedding makes four temporaries the size of the queries and a rotated copy. These
work token by token, so computing them over slices of the sequence gives the same values
with a fraction of the memory (the rotary embedding also rotates in place). Two more
copies of the hidden states are structural: the model keeps its input embeddings alive
through the whole layer loop while each layer returns a fresh tensor, and the attention's
output projection writes a fresh tensor beside its input. So, for long prefills without
autograd, each decoder layer writes its output back into its input (one residual-stream
buffer for all layers: the embeddings' own), and the output projection, token-wise and
square, overwrites its input slice by slice (its input is the attention output, which
nothing reads afterwards). At 128k tokens on Llama-3-8B each spares 1 GiB.

We wrap the ``forward`` of the model's own modules (every ``*.mlp``, every RMSNorm, every
decoder layer and the attention modules' square ``o_proj``) and the ``apply_rotary_pos_emb``
of the module that defines its attention, instead of copying modeling code, so any family
built from them gets it. Attention itself is untouched (SDPA and flash attention do not
materialise the attention matrix); logits stay last-token-only. Writing a layer's output
into its input means a caller asking for every layer's hidden states would get the last
one each time: the prefill never asks for them.

A wrapped module runs in one piece whenever its input has at most ``chunk_tokens``
positions (decoding, short prompts), so results can change only for long prompts, and
there only by how the matrix library rounds a product over fewer rows (it may pick
another kernel: on the CPU tests at most 1e-6 apart, with the same kept positions and the
same generated tokens; see `tests/test_chunked.py`).
"""

from __future__ import annotations

import functools
import sys

import torch

#: positions per chunk of a long prefill; prompts up to this length run unchunked
DEFAULT_CHUNK_TOKENS = 8192


def token_wise_modules(model) -> list[torch.nn.Module]:
    """The modules that act on each position alone: the layers' MLPs and every RMSNorm."""
    return [module for name, module in model.named_modules()
            if name.endswith(".mlp") or type(module).__name__.endswith("RMSNorm")]


def square_output_projections(model) -> list[torch.nn.Linear]:
    """The attention modules' output projections that map the attention output to a tensor of its own shape."""
    projections = (getattr(module, "o_proj", None) for module in model.modules()
                   if type(module).__name__.endswith("Attention"))
    return [projection for projection in projections
            if type(projection) is torch.nn.Linear and projection.in_features == projection.out_features]


def decoder_layers(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]


def install_chunking(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
    """Make the model's token-wise modules run long inputs in chunks of ``chunk_tokens`` positions (once)."""
    if getattr(model, "_kvbench_chunk_tokens", None) == chunk_tokens:
        return
    for wrapper, modules in ((_chunked_forward, token_wise_modules(model)),
                             (_chunked_in_place_forward, square_output_projections(model)),
                             (_layer_output_in_place_forward, decoder_layers(model))):
        for module in modules:
            original = getattr(module, "_kvbench_unchunked_forward", module.forward)
            module._kvbench_unchunked_forward = original
            module.forward = functools.partial(wrapper, original, chunk_tokens)
    for modeling in {sys.modules[type(module).__module__] for module in model.modules()
                     if type(module).__name__.endswith("Attention")}:
        rotary = getattr(modeling, "apply_rotary_pos_emb", None)
        if rotary is not None:
            original = getattr(rotary, "_kvbench_unchunked", rotary)
            chunked = functools.partial(_chunked_rotary, original, chunk_tokens)
            chunked._kvbench_unchunked = original
            modeling.apply_rotary_pos_emb = chunked
    model._kvbench_chunk_tokens = chunk_tokens


def _chunked_forward(original, chunk_tokens: int, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    length = hidden_states.shape[-2] if hidden_states.dim() >= 2 else 0
    if length <= chunk_tokens:
        return original(hidden_states, *args, **kwargs)
    first = original(hidden_states[..., :chunk_tokens, :], *args, **kwargs)
    output = first.new_empty(*first.shape[:-2], length, first.shape[-1])
    output[..., :chunk_tokens, :] = first
    del first
    for start in range(chunk_tokens, length, chunk_tokens):
        end = min(start + chunk_tokens, length)
        output[..., start:end, :] = original(hidden_states[..., start:end, :], *args, **kwargs)
    return output


def _in_place_applies(hidden_states: torch.Tensor, chunk_tokens: int) -> bool:
    return (hidden_states.dim() >= 2 and hidden_states.shape[-2] > chunk_tokens and hidden_states.is_contiguous()
            and not torch.is_grad_enabled())


def _chunked_in_place_forward(original, chunk_tokens: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """A square token-wise module (the output projection) over slices of a long input, each written over its input."""
    if not _in_place_applies(hidden_states, chunk_tokens):
        return _chunked_forward(original, chunk_tokens, hidden_states)
    for start in range(0, hidden_states.shape[-2], chunk_tokens):
        part = hidden_states[..., start : start + chunk_tokens, :]
        part.copy_(original(part))
    return hidden_states


def _layer_output_in_place_forward(original, chunk_tokens: int, hidden_states: torch.Tensor, *args, **kwargs):
    """A decoder layer whose output, during a long prefill, is written into its input (the residual-stream buffer)."""
    output = original(hidden_states, *args, **kwargs)
    if not _in_place_applies(hidden_states, chunk_tokens):
        return output
    new_states = output[0] if isinstance(output, tuple) else output
    if new_states.shape != hidden_states.shape or new_states.dtype != hidden_states.dtype:
        return output
    hidden_states.copy_(new_states)
    del new_states
    return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states


def _chunked_rotary(original, chunk_tokens: int, queries: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, *args, unsqueeze_dim: int = 1, **kwargs):
    """``apply_rotary_pos_emb`` over slices of the sequence, each slice written back in place.

    Elementwise, so the values are exactly the unchunked ones; its temporaries are a slice's, and
    rotating in place spares a second copy of the queries and keys. In place is safe because the
    attention modules pass freshly projected queries and keys and use only the rotated ones after
    (inference only: nothing keeps the unrotated values for a backward pass).
    """
    sequence_dim = 2 if unsqueeze_dim == 1 else 1
    length = queries.shape[sequence_dim]
    if length <= chunk_tokens or cos.dim() < 3 or cos.shape[1] != length or torch.is_grad_enabled():
        return original(queries, keys, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
    for start in range(0, length, chunk_tokens):
        size = min(chunk_tokens, length - start)
        query_part, key_part = queries.narrow(sequence_dim, start, size), keys.narrow(sequence_dim, start, size)
        rotated_queries, rotated_keys = original(query_part, key_part, cos[:, start : start + size],
                                                 sin[:, start : start + size], *args, unsqueeze_dim=unsqueeze_dim,
                                                 **kwargs)
        query_part.copy_(rotated_queries)
        key_part.copy_(rotated_keys)
    return queries, keys
