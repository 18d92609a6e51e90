"""Chunked per-token modules during prefill: the same outputs with chunks that do not divide the length."""

import pytest
import torch

from kvbench.engine.chunked import install_chunking, token_wise_modules
from kvbench.engine.generate import generate_greedy, generate_stream
from kvbench.engine.prefill import DecodeRequest, prefill
from kvbench.methods import build_method
from kvbench.methods.base import ModelInfo
from tests.tiny_models import FAMILIES, random_prompt, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_prefill_gives_the_same_cache_and_tokens(family):
    """The same kept cache up to the matrix library's rounding of a smaller product (a matmul over 37 rows
    may round one ulp apart from one over 150: here at most 1e-6), the same kept positions, the same tokens."""
    model = tiny_model(family, num_layers=3)
    compressor = build_method("snapkv", capacity=40).prepare(ModelInfo("tiny", 3))
    prompt = random_prompt(150, seed=2)
    request = DecodeRequest(prompt, 4, set())
    whole = prefill(model, compressor, request, chunk_tokens=1000)
    whole_tokens = generate_greedy(model, prompt, compressor, 12, set()).token_ids
    for chunk in (64, 37, 1):
        chunked = prefill(model, compressor, request, chunk_tokens=chunk)
        assert chunked.first_token == whole.first_token and chunked.kept_per_layer == whole.kept_per_layer
        for (keys, values), (whole_keys, whole_values) in zip(chunked.kept, whole.kept):
            torch.testing.assert_close(keys, whole_keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(values, whole_values, rtol=1e-5, atol=1e-6)
        (generation,) = generate_stream(model, compressor, [DecodeRequest(prompt, 12, set())], chunk_tokens=chunk)
        assert generation.token_ids == whole_tokens


def test_every_mlp_and_norm_is_chunked_and_short_inputs_run_whole():
    model = tiny_model("llama", num_layers=2)
    names = {type(module).__name__ for module in token_wise_modules(model)}
    assert names == {"LlamaMLP", "LlamaRMSNorm"}
    assert len(token_wise_modules(model)) == 2 + 2 * 2 + 1  # 2 MLPs, 2 norms per layer, the final norm
    calls = []
    install_chunking(model, 16)
    mlp = model.model.layers[0].mlp
    original = mlp._kvbench_unchunked_forward

    def counting(hidden_states):
        calls.append(hidden_states.shape[-2])
        return original(hidden_states)

    mlp._kvbench_unchunked_forward = counting
    install_chunking(model, 10)  # re-installing wraps the original again, not the wrapper
    with torch.inference_mode():
        mlp(torch.randn(1, 25, 64))
        mlp(torch.randn(1, 4, 64))
    assert calls == [10, 10, 5, 4]


def test_rotary_embedding_in_chunks_is_exact():
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama", num_layers=1)
    install_chunking(model, 16)
    rotary = modeling_llama.apply_rotary_pos_emb
    assert rotary._kvbench_unchunked is not rotary
    queries, keys = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16)
    cos, sin = torch.randn(1, 50, 16), torch.randn(1, 50, 16)
    expected = rotary._kvbench_unchunked(queries, keys, cos, sin)
    with torch.inference_mode():
        actual = rotary(queries.clone(), keys.clone(), cos, sin)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    assert torch.equal(rotary(queries, keys, cos, sin)[0], expected[0])  # with autograd on: not in place
    install_chunking(model, 8)  # re-installing wraps the original, not the wrapper
    assert modeling_llama.apply_rotary_pos_emb._kvbench_unchunked is rotary._kvbench_unchunked


def test_long_prefill_keeps_one_residual_stream_buffer_and_projects_in_place():
    """During a long prefill every decoder layer returns its own input tensor (the embeddings' buffer, so no
    second copy of the hidden states lives through the layer loop) and the output projection overwrites its
    input; short inputs, and any call under autograd, get fresh tensors as the modeling code makes them."""
    model = tiny_model("llama", num_layers=3)
    install_chunking(model, 16)
    returned_own_input = []

    def record(module, args, kwargs, output):
        returned_own_input.append(output.data_ptr() == args[0].data_ptr())

    for layer in model.model.layers:
        layer.register_forward_hook(record, with_kwargs=True)
        layer.self_attn.o_proj.register_forward_hook(record, with_kwargs=True)
    compressor = build_method("snapkv", capacity=40).prepare(ModelInfo("tiny", 3))
    prefill(model, compressor, DecodeRequest(random_prompt(50, seed=3), 4, set()), chunk_tokens=16)
    assert returned_own_input == [True] * 6
    returned_own_input.clear()
    prefill(model, compressor, DecodeRequest(random_prompt(12, seed=3), 4, set()), chunk_tokens=16)
    assert returned_own_input == [False] * 6
    returned_own_input.clear()
    model(torch.tensor([random_prompt(50, seed=3)]))  # autograd on
    assert returned_own_input == [False] * 6
