"""Training the task classifier on CPU in minutes: frozen lower layers, fine-tuned last layer and head.

What we fine-tune, and why. Fine-tuning all of MiniLM at 512 tokens costs about
2 s per sample per epoch on two CPU cores (backward through every layer), too
slow for CI; training only the head on frozen first-token features is cheap but
reached only ~80% held-out accuracy on longbench-mini (the features of a frozen
sentence encoder say what a prompt is about, not which task template it follows).
We therefore freeze all layers but the last and fine-tune the last layer, the
pooler when it is used, and the head (~90% held-out on longbench-mini):

1. Each prompt is read once as its `PromptReader` says (about 100 tokens: the
   instruction and the question, see `kvbench.classifier.model`) and the
   penultimate layer's hidden states are cached (float16, on the CPU).
2. Only the first token's output is classified, so the last layer needs only the
   first token's attention row and feed-forward row. `first_token_last_layer`
   computes exactly what the encoder's own last layer computes for that position
   (checked against the full encoder on the first batch) at under 1% of the
   cost of the whole layer. An epoch then takes a second, and every
   leave-one-task-out fold can be retrained from the cache.

At inference the checkpoint runs through the unmodified encoder
(`TaskClassifierModel.forward`). The cached states are stored as float16, so
training and held-out figures see hidden states rounded to ~1e-3; predictions on
the held-out split match the full-precision path up to that rounding.

Few-shot prompts (answer cue on `MIN_DEMONSTRATIONS` lines or more) are "other"
by rule, at inference and in every figure here, and are left out of fitting
(``train_on_few_shot``): triviaqa's instruction is hotpotqa's plus "The
following are some examples", and fitting the encoder to tell them apart only
teaches it template details.

The loss is cross-entropy with prompt weights (``balance``): each label weighs
the same (LongBench has 8 QA tasks and 13 others, and a classifier that answers
"other" everywhere would otherwise look good), and within a label each task
weighs the same, so that a task with 200 prompts (the full LongBench files beside
longbench-mini's ~11 per task) does not teach its template as the label.

Leave-one-task-out accuracy, mean over the 21 tasks (each task scored by a model
trained without it). "CLI" figures are `kvbench train-classifier --held-out-tasks
all` (seed 0) on longbench-mini and on longbench-mini + the 3 full LongBench
files; "3 seeds" figures are the mean of seeds 0-2 on longbench-mini, with the
same training (single runs vary by about +-0.04 with the seed):

=============================================================  ===================  ========
reading                                                        longbench-mini       + full
=============================================================  ===================  ========
first 256 + last 256 tokens (the reference's)                  0.679 CLI            0.693
first 32 + last 64 tokens                                      0.872 3 seeds
first 64 + 64 / 32 + 96 / 48 + 64 / 32 + 48 / 32 + 32 tokens   0.78 / 0.78 / 0.83 / 0.79 / 0.71 (3 seeds)
32 + 64 tokens, log(demonstration count) as a learnt feature   0.81-0.85, triviaqa 0
frozen MiniLM mean-pooled head and tail, logistic regression   0.71 at best
32 + 64 tokens, NFKC, few-shot rule                            0.897 3 seeds
paragraphs within 32 + 64 tokens, NFC, few-shot rule           0.934 3 seeds
paragraphs within 48 + 96 tokens, NFKC, few-shot rule          0.939 3 seeds
paragraphs within 32 + 64 tokens, NFKC, few-shot rule          0.925 3 seeds,       0.902
(the default)                                                  0.902 CLI
=============================================================  ===================  ========

With the default, every task but two scores 0.93-1.00 held out; qmsum (query-based
summarization, "Query: ...\nAnswer:", labelled "other") and passage_retrieval_zh
(a Chinese prompt ending in "答案是：", which MiniLM reads as [UNK]s and a colon) score 0:
both read like QA prompts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from kvbench.classifier.data import LabelledPrompt, choose_held_out_tasks, split_held_out
from kvbench.classifier.model import EMBEDDED_ENCODER, LABELS, PromptReader, TaskClassifierModel, load_encoder, pad_batch
from kvbench.console import progress_bar, progress_bars_enabled
from kvbench.errors import KvbenchError

#: prompts encoded per forward pass while caching penultimate states
ENCODING_BATCH_SIZE = 8
WEIGHT_DECAY = 0.01
#: largest |difference| tolerated between our last-layer recomputation and the encoder's own
RECOMPUTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TrainingConfig:
    encoder: str = EMBEDDED_ENCODER
    epochs: int = 10
    #: AdamW's, for the last encoder layer, the pooler and the head alike (best of 1e-4..3e-3 on longbench-mini)
    learning_rate: float = 1e-3
    batch_size: int = 16
    held_out_fraction: float = 0.2
    #: "per-category", "all", "none" or a comma list of tasks (see `choose_held_out_tasks`)
    held_out_tasks: str = "per-category"
    seed: int = 0
    device: str = "cpu"
    #: what the classifier reads of a prompt
    reader: PromptReader = field(default_factory=PromptReader)
    #: also fit the encoder on prompts the reader labels few-shot by their demonstrations
    train_on_few_shot: bool = False
    #: "task": every task weighs the same within its label, however many prompts it has; "label": each
    #: label weighs the same (prompts of a label weigh alike)
    balance: str = "task"

    def validate(self) -> None:
        """One KvbenchError line for any unusable setting, before any slow work."""
        check_device(self.device)
        if self.epochs < 1:
            raise KvbenchError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise KvbenchError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise KvbenchError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0 < self.held_out_fraction < 1:
            raise KvbenchError(f"--held-out-fraction must be between 0 and 1, got {self.held_out_fraction}")
        if self.balance not in BALANCES:
            raise KvbenchError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        self.reader.check()


#: how `fit` weighs prompts (see `TrainingConfig.balance`)
BALANCES = ("task", "label")


def usable_devices() -> list[str]:
    """The torch devices training can use on this machine: cpu, cuda and cuda:N per GPU, mps."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str) -> None:
    """One KvbenchError line unless ``device`` is one of `usable_devices()`."""
    devices = usable_devices()
    if device not in devices:
        raise KvbenchError(f"--device {device!r} is not usable on this machine; usable: {', '.join(devices)}")


@dataclass
class TrainingResult:
    model: TaskClassifierModel
    tokenizer: object
    #: figures and settings, stored in the checkpoint's JSON under "training"
    summary: dict


def first_token_last_layer(layer: nn.Module, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The output of BERT-style ``layer`` at position 0 only: [batch, hidden] from states [batch, tokens, hidden].

    ``key_mask`` [batch, tokens] is True on real tokens. Same computation as
    transformers' BertLayer (self-attention, output dense + dropout + residual
    LayerNorm, intermediate, output), with dropout active when ``layer.training``,
    but the key and value projections are folded into the single query instead of
    being applied to every token: with one query per head, ``q . (W_k h + b_k) =
    (W_k^T q) . h + q . b_k`` and ``sum_t a_t (W_v h_t + b_v) = W_v (sum_t a_t h_t) +
    (sum_t a_t) b_v``, which costs tokens x hidden per head instead of tokens x
    hidden^2. ``q . b_k`` is the same for every token, so the softmax cancels it
    (in the encoder too, where b_k gets no gradient either).
    """
    attention = layer.attention.self
    batch = hidden_states.shape[0]
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    hidden_size = hidden_states.shape[-1]
    query = attention.query(hidden_states[:, 0]).view(batch, heads, head_size)
    key_weight = attention.key.weight.view(heads, head_size, hidden_size)
    value_weight = attention.value.weight.view(heads, head_size, hidden_size)
    query_in_hidden_space = torch.einsum("bnd,ndi->bni", query, key_weight)
    scores = torch.einsum("bni,bti->bnt", query_in_hidden_space, hidden_states) * head_size ** -0.5
    scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1), attention.dropout.p, training=layer.training)
    mixed_states = torch.einsum("bnt,bti->bni", weights, hidden_states)
    context = (torch.einsum("bni,ndi->bnd", mixed_states, value_weight)
               + weights.sum(dim=-1, keepdim=True) * attention.value.bias.view(heads, head_size))
    context = context.reshape(batch, 1, heads * head_size)
    attention_output = layer.attention.output(context, hidden_states[:, :1])
    return layer.output(layer.intermediate(attention_output), attention_output)[:, 0]


@dataclass
class CachedPrompts:
    """What training needs of each prompt, computed once: the penultimate layer's hidden states of what the
    reader read (float16 [tokens, hidden], on the CPU), the label, the task, and whether the reader labels it
    few-shot by its demonstrations alone."""

    states: list[torch.Tensor]
    labels: list[int]
    tasks: list[str]
    few_shot: list[bool]


def cache_penultimate_states(model: TaskClassifierModel, tokenizer, prompts: Sequence[LabelledPrompt],
                             few_shot: list[bool], device: str, encoder: str) -> CachedPrompts:
    """Read every prompt as ``model.reader`` does and keep the penultimate layer's hidden states (``few_shot``:
    which prompts the reader labels few-shot)."""
    states: list[torch.Tensor] = []
    last_layer = model.encoder.encoder.layer[-1]
    model.eval()
    with progress_bar(total=len(prompts), desc="encoding prompts", unit="prompt") as progress:
        for start in range(0, len(prompts), ENCODING_BATCH_SIZE):
            batch = prompts[start:start + ENCODING_BATCH_SIZE]
            batch_ids = [model.reader.token_ids(tokenizer, prompt.text) for prompt in batch]
            input_ids, attention_mask = (tensor.to(device) for tensor in pad_batch(tokenizer, batch_ids))
            with torch.no_grad():
                output = model.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                penultimate = output.hidden_states[-2]
                if start == 0:
                    recomputed = first_token_last_layer(last_layer, penultimate, attention_mask.bool())
                    difference = (recomputed - output.last_hidden_state[:, 0]).abs().max().item()
                    if not difference <= RECOMPUTATION_TOLERANCE:
                        raise KvbenchError(f"encoder {encoder!r}: its last layer does not recompute as a BERT layer "
                                           f"(difference {difference:.2g}); use a BERT-like encoder such as bert-base-cased")
            for row, ids in enumerate(batch_ids):
                states.append(penultimate[row, :len(ids)].to("cpu", torch.float16))
            progress.update(len(batch))
    return CachedPrompts(states, [prompt.label for prompt in prompts], [prompt.task for prompt in prompts], few_shot)


def padded_states(states: Sequence[torch.Tensor], indices: Sequence[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [batch, tokens, hidden] in float32, key mask [batch, tokens]) of the chosen prompts."""
    longest = max(states[index].shape[0] for index in indices)
    hidden = states[indices[0]].shape[1]
    batch_states = torch.zeros(len(indices), longest, hidden)
    key_mask = torch.zeros(len(indices), longest, dtype=torch.bool)
    for row, index in enumerate(indices):
        length = states[index].shape[0]
        batch_states[row, :length] = states[index].float()
        key_mask[row, :length] = True
    return batch_states.to(device), key_mask.to(device)


def cached_logits(model: TaskClassifierModel, cached: CachedPrompts, indices: Sequence[int], device: str) -> torch.Tensor:
    """Logits [batch, 2] of the chosen prompts from their cached penultimate states (in the model's current mode)."""
    batch_states, key_mask = padded_states(cached.states, indices, device)
    first_token = first_token_last_layer(model.encoder.encoder.layer[-1], batch_states, key_mask)
    return model.classify_first_token(first_token)


@contextmanager
def single_cpu_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread for a while.

    A training step on cached states is a few small matrix products (tens of MFLOP).
    A second thread gains little there, and when the cores are shared with other
    processes every op waits for a descheduled thread: we measured 0.03 s per step
    on one thread against 0.7 s on two on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prompt_weights(cached: CachedPrompts, indices: Sequence[int], balance: str) -> dict[int, float]:
    """Loss weight of each chosen prompt, 1 on average: each label weighs the same in total, and with
    ``balance`` "task" each task the same within its label (a task of 200 prompts beside tasks of 10
    would otherwise teach its template as the label)."""
    label_counts = Counter(cached.labels[index] for index in indices)
    task_counts = Counter(cached.tasks[index] for index in indices)
    tasks_per_label = Counter(label for label, _ in {(cached.labels[index], cached.tasks[index]) for index in indices})
    weights = {}
    for index in indices:
        label = cached.labels[index]
        if balance == "task":
            weights[index] = len(indices) / (len(label_counts) * tasks_per_label[label] * task_counts[cached.tasks[index]])
        else:
            weights[index] = len(indices) / (len(label_counts) * label_counts[label])
    return weights


def fit(model: TaskClassifierModel, cached: CachedPrompts, indices: Sequence[int], config: TrainingConfig,
        description: str, leave_progress: bool) -> None:
    """Train the model's trained parameters on the chosen prompts (the rest of the encoder stays frozen)."""
    trained = set(model.trained_parameter_names())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    optimizer = torch.optim.AdamW([parameter for name, parameter in model.named_parameters() if name in trained],
                                  lr=config.learning_rate, weight_decay=WEIGHT_DECAY)
    weights = prompt_weights(cached, indices, config.balance)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the dropout masks
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    model.train()
    with single_cpu_thread(), progress_bar(total=config.epochs * steps_per_epoch, desc=description, unit="step",
                                           leave=leave_progress) as progress:
        for _ in range(config.epochs):
            order = torch.randperm(len(indices), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                batch = [indices[position] for position in order[start:start + config.batch_size]]
                targets = torch.tensor([cached.labels[index] for index in batch], device=config.device)
                batch_weights = torch.tensor([weights[index] for index in batch], device=config.device)
                losses = F.cross_entropy(cached_logits(model, cached, batch, config.device), targets, reduction="none")
                loss = (losses * batch_weights).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                progress.update(1)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def predict_cached(model: TaskClassifierModel, cached: CachedPrompts, indices: Sequence[int],
                   device: str, batch_size: int) -> list[int]:
    """Predicted label indices of the chosen prompts (eval mode), as `TaskClassifier.predict_batch` decides:
    few-shot prompts "other", the others by the model."""
    model.eval()
    predictions = {index: LABELS.index("other") for index in indices if cached.few_shot[index]}
    pending = [index for index in indices if index not in predictions]
    with single_cpu_thread(), torch.no_grad():
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            predictions.update(zip(batch, cached_logits(model, cached, batch, device).argmax(dim=1).tolist()))
    return [predictions[index] for index in indices]


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int]) -> list[list[int]]:
    """counts[true label][predicted label]."""
    counts = [[0] * len(LABELS) for _ in LABELS]
    for target, prediction in zip(targets, predictions):
        counts[target][prediction] += 1
    return counts


def accuracy_figures(targets: Sequence[int], predictions: Sequence[int]) -> dict:
    """Accuracy, balanced accuracy (mean recall over the labels present) and the confusion matrix."""
    matrix = confusion_matrix(targets, predictions)
    recalls = [row[label] / sum(row) for label, row in enumerate(matrix) if sum(row)]
    return {
        "accuracy": sum(matrix[label][label] for label in range(len(LABELS))) / len(targets),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "confusion_matrix": matrix,
    }


def trained_state(model: TaskClassifierModel) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in model.trained_parameter_names()}


def train_classifier(prompts: Sequence[LabelledPrompt], config: TrainingConfig,
                     report: Callable[[str], None] = print) -> TrainingResult:
    """Train on a stratified split of ``prompts``, score the held-out part and whole held-out tasks.

    The returned model is the one trained on the training split, so the held-out
    figures describe it. Leave-one-task-out folds retrain from the same starting
    point on every other task (both splits) and are scored on the held-out task.
    """
    config.validate()
    reader = config.reader
    labels = [prompt.label for prompt in prompts]
    if len(set(labels)) < len(LABELS):
        raise KvbenchError("the data holds only one kind of task; training needs both QA and other tasks")
    train_indices, held_out_indices = split_held_out(prompts, config.held_out_fraction, config.seed)
    if len({labels[index] for index in train_indices}) < len(LABELS):
        raise KvbenchError("the training split lacks one label; add samples")
    # Few-shot depends on the text alone: decided before the encoder loads, so a split that cannot train fails first.
    few_shot = [reader.is_few_shot(prompt.text) for prompt in prompts]

    def fitted(indices: Sequence[int]) -> list[int]:
        """The prompts of ``indices`` the encoder is fitted on."""
        return [index for index in indices if config.train_on_few_shot or not few_shot[index]]

    fitted_train = fitted(train_indices)
    if len({labels[index] for index in fitted_train}) < len(LABELS):
        raise KvbenchError("the training split lacks one label once few-shot prompts are set aside; add samples")
    held_out_tasks = choose_held_out_tasks(config.held_out_tasks, prompts)

    torch.manual_seed(config.seed)  # the head's initial weights
    tokenizer, encoder_model, pooler_is_trained = load_encoder(config.encoder, progress=progress_bars_enabled())
    model = TaskClassifierModel(encoder_model, "pooler" if pooler_is_trained else "first-token", reader)
    model = model.to(config.device)
    initial_state = trained_state(model)
    report(f"encoder {config.encoder} ({model.pooling} features), reading {describe_reader(reader)}; "
           f"{len(prompts)} prompts from {len(set(p.task for p in prompts))} tasks: {len(train_indices)} train, "
           f"{len(held_out_indices)} held out")
    cached = cache_penultimate_states(model, tokenizer, prompts, few_shot, config.device, config.encoder)
    few_shot_count = sum(few_shot)
    if few_shot_count:
        report(f"{few_shot_count} few-shot prompt(s) (answer cue on {reader.min_demonstrations}+ lines) are \"other\" "
               f"by their demonstrations{'' if config.train_on_few_shot else ' and left out of fitting'}")
    fit(model, cached, fitted_train, config, "training", leave_progress=True)
    held_out_predictions = predict_cached(model, cached, held_out_indices, config.device, config.batch_size)
    held_out = accuracy_figures([labels[index] for index in held_out_indices], held_out_predictions)
    final_state = trained_state(model)

    task_accuracy: dict[str, float] = {}
    task_targets: list[int] = []
    task_predictions: list[int] = []
    for task in held_out_tasks:
        others = fitted([index for index, prompt in enumerate(prompts) if prompt.task != task])
        if len({labels[index] for index in others}) < len(LABELS):
            report(f"not holding out {task}: the other tasks lack its label")
            continue
        model.load_state_dict(initial_state, strict=False)
        fit(model, cached, others, config, f"without {task}", leave_progress=False)
        task_indices = [index for index, prompt in enumerate(prompts) if prompt.task == task]
        predictions = predict_cached(model, cached, task_indices, config.device, config.batch_size)
        targets = [labels[index] for index in task_indices]
        task_accuracy[task] = accuracy_figures(targets, predictions)["accuracy"]
        task_targets += targets
        task_predictions += predictions
        report(f"held-out task {task:22s} ({LABELS[targets[0]]:5s}, n={len(targets):3d}): accuracy {task_accuracy[task]:.3f}")
    model.load_state_dict(final_state, strict=False)

    summary = {
        "encoder": config.encoder,
        "pooling": model.pooling,
        "reader": reader.to_metadata(),
        "prompts_per_task": dict(Counter(prompt.task for prompt in prompts)),
        "train_prompts": len(train_indices),
        "held_out_prompts": len(held_out_indices),
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "balance": config.balance,
        "train_on_few_shot": config.train_on_few_shot,
        "few_shot_prompts": few_shot_count,
        "held_out_fraction": config.held_out_fraction,
        "seed": config.seed,
        "held_out": held_out,
        "held_out_tasks": {
            "accuracy_per_task": task_accuracy,
            # every task counts the same, however many prompts it has
            "mean_over_tasks": sum(task_accuracy.values()) / len(task_accuracy) if task_accuracy else None,
            # over all prompts of the held-out tasks, each scored by the fold that never saw its task
            "overall": accuracy_figures(task_targets, task_predictions) if task_targets else None,
        },
    }
    return TrainingResult(model, tokenizer, summary)


def describe_reader(reader: PromptReader) -> str:
    """What the reader reads, in words, for the training report."""
    unit = "paragraphs within" if reader.paragraphs else "tokens:"
    return (f"{unit} the first {reader.head_tokens} and last {reader.tail_tokens} tokens ({reader.unicode_form})")


def format_confusion_matrix(matrix: Sequence[Sequence[int]]) -> str:
    """Rows: true label; columns: predicted label."""
    width = max(len(label) for label in LABELS) + 2
    lines = ["true \\ predicted".ljust(18) + "".join(label.rjust(width) for label in LABELS)]
    for label, row in zip(LABELS, matrix):
        lines.append(label.ljust(18) + "".join(str(count).rjust(width) for count in row))
    return "\n".join(lines)
