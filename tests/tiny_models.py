"""Tiny random-weight causal LMs of the families the hook must support, built from configs."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
}


def tiny_model(family: str = "llama", num_layers: int = 4, attn: str = "sdpa", seed: int = 0, vocab_size: int | None = None):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    settings = {**COMMON, **({"vocab_size": vocab_size} if vocab_size else {})}
    config = config_class(num_hidden_layers=num_layers, **settings, **extra)
    config._attn_implementation = attn
    model = model_class(config).eval()
    # Larger random weights make attention peaky, so different budgets really change the outputs.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4)
    return model


def random_prompt(length: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (length,), generator=generator).tolist()


def byte_tokenizer():
    """A byte-level tokenizer of 256 byte symbols plus <s> and </s> (no merges): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocabulary = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocabulary["<s>"] = len(vocabulary)
    vocabulary["</s>"] = len(vocabulary)
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_loaded_model(family: str = "llama", num_layers: int = 4, seed: int = 0):
    """A tiny random model with the byte tokenizer, as kvbench's loader would hand it to the run loop."""
    from kvbench.harness.model import LoadedModel

    tokenizer = byte_tokenizer()
    model = tiny_model(family, num_layers=num_layers, seed=seed, vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{family}", identity={"test_model": family})
