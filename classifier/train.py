"""Training the task classifier on CPU in minutes: frozen lower layers, fine-tuned last layer and head.

What we fine-tune, and why. Fine-tuning all of MiniLM at 512 tokens costs about
2 s per sample per epoch on two CPU cores (backward through every layer), too
slow for CI; training only the head on frozen first-token features is cheap but
reached only ~80% held-out accuracy on longbench-mini (the features of a frozen
sentence encoder say what a prompt is about, not which task template it follows).
We therefore freeze all layers but the last and fine-tune the last layer, the
pooler when it is used, and the head (~90% held-out on longbench-mini):

1. Each prompt is encoded once (head and tail, 512 tokens at most) and the
   penultimate layer's hidden states are cached (float16, ~0.4 MB per prompt
   for MiniLM).
2. Only the first token's output is classified, so the last layer needs only the
   first token's attention row and feed-forward row. `first_token_last_layer`
   computes exactly what the encoder's own last layer computes for that position
   (checked against the full encoder on the first batch) at under 1% of the
   cost of the whole layer (0.02 s against 3 s for forward and backward of 16
   MiniLM prompts on one core). An epoch then takes seconds, and every
   leave-one-task-out fold can be retrained from the cache.

At inference the checkpoint runs through the unmodified encoder
(`TaskClassifierModel.forward`). The cached states are stored as float16, so
training and held-out figures see hidden states rounded to ~1e-3; predictions on
the held-out split match the full-precision path up to that rounding.

The loss is cross-entropy weighted by inverse class frequency: LongBench has 8
QA tasks and 13 others, and a classifier that answers "other" everywhere would
otherwise look good.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from kvbench.classifier.data import LabelledPrompt, choose_held_out_tasks, split_held_out
from kvbench.classifier.model import (EMBEDDED_ENCODER, LABELS, MAX_LENGTH, TaskClassifierModel, head_and_tail_ids,
                                      load_encoder, pad_batch)
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

    def validate(self) -> None:
        if self.epochs < 1:
            raise KvbenchError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise KvbenchError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise KvbenchError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0 < self.held_out_fraction < 1:
            raise KvbenchError(f"--held-out-fraction must be between 0 and 1, got {self.held_out_fraction}")


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


def cache_penultimate_states(model: TaskClassifierModel, tokenizer, prompts: Sequence[LabelledPrompt],
                             device: str, encoder: str) -> list[torch.Tensor]:
    """Per prompt, the penultimate layer's hidden states [tokens, hidden] (float16, on the CPU)."""
    states: list[torch.Tensor] = []
    last_layer = model.encoder.encoder.layer[-1]
    model.eval()
    with tqdm(total=len(prompts), desc="encoding prompts", unit="prompt") as progress:
        for start in range(0, len(prompts), ENCODING_BATCH_SIZE):
            batch = prompts[start:start + ENCODING_BATCH_SIZE]
            batch_ids = [head_and_tail_ids(tokenizer, prompt.text, MAX_LENGTH) for prompt in batch]
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
    return states


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


def cached_logits(model: TaskClassifierModel, states: Sequence[torch.Tensor], indices: Sequence[int],
                  device: str) -> torch.Tensor:
    """Logits [batch, 2] of the chosen prompts from their cached penultimate states (in the model's current mode)."""
    batch_states, key_mask = padded_states(states, indices, device)
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


def fit(model: TaskClassifierModel, states: Sequence[torch.Tensor], labels: Sequence[int], indices: Sequence[int],
        config: TrainingConfig, description: str, leave_progress: bool) -> None:
    """Train the model's trained parameters on the chosen prompts (the rest of the encoder stays frozen)."""
    trained = set(model.trained_parameter_names())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    optimizer = torch.optim.AdamW([parameter for name, parameter in model.named_parameters() if name in trained],
                                  lr=config.learning_rate, weight_decay=WEIGHT_DECAY)
    counts = Counter(labels[index] for index in indices)
    class_weights = torch.tensor([len(indices) / (len(LABELS) * counts[label]) for label in range(len(LABELS))],
                                 device=config.device)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the dropout masks
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    model.train()
    with single_cpu_thread(), tqdm(total=config.epochs * steps_per_epoch, desc=description, unit="step",
                                   leave=leave_progress) as progress:
        for _ in range(config.epochs):
            order = torch.randperm(len(indices), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                batch = [indices[position] for position in order[start:start + config.batch_size]]
                targets = torch.tensor([labels[index] for index in batch], device=config.device)
                loss = F.cross_entropy(cached_logits(model, states, batch, config.device), targets, weight=class_weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                progress.update(1)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def predict_cached(model: TaskClassifierModel, states: Sequence[torch.Tensor], indices: Sequence[int],
                   device: str, batch_size: int) -> list[int]:
    """Predicted label indices of the chosen prompts (eval mode)."""
    model.eval()
    predictions: list[int] = []
    with single_cpu_thread(), torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start:start + batch_size])
            predictions.extend(cached_logits(model, states, batch, device).argmax(dim=1).tolist())
    return predictions


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
    labels = [prompt.label for prompt in prompts]
    if len(set(labels)) < len(LABELS):
        raise KvbenchError("the data holds only one kind of task; training needs both QA and other tasks")
    train_indices, held_out_indices = split_held_out(prompts, config.held_out_fraction, config.seed)
    if len({labels[index] for index in train_indices}) < len(LABELS):
        raise KvbenchError("the training split lacks one label; add samples")
    held_out_tasks = choose_held_out_tasks(config.held_out_tasks, prompts)

    torch.manual_seed(config.seed)  # the head's initial weights
    tokenizer, encoder_model, pooler_is_trained = load_encoder(config.encoder)
    model = TaskClassifierModel(encoder_model, "pooler" if pooler_is_trained else "first-token").to(config.device)
    initial_state = trained_state(model)
    report(f"encoder {config.encoder} ({model.pooling} features); {len(prompts)} prompts from {len(set(p.task for p in prompts))} "
           f"tasks: {len(train_indices)} train, {len(held_out_indices)} held out")
    states = cache_penultimate_states(model, tokenizer, prompts, config.device, config.encoder)

    fit(model, states, labels, train_indices, config, "training", leave_progress=True)
    held_out_predictions = predict_cached(model, states, held_out_indices, config.device, config.batch_size)
    held_out = accuracy_figures([labels[index] for index in held_out_indices], held_out_predictions)
    final_state = trained_state(model)

    task_accuracy: dict[str, float] = {}
    task_targets: list[int] = []
    task_predictions: list[int] = []
    for task in held_out_tasks:
        others = [index for index, prompt in enumerate(prompts) if prompt.task != task]
        if len({labels[index] for index in others}) < len(LABELS):
            report(f"not holding out {task}: the other tasks lack its label")
            continue
        model.load_state_dict(initial_state, strict=False)
        fit(model, states, labels, others, config, f"without {task}", leave_progress=False)
        task_indices = [index for index, prompt in enumerate(prompts) if prompt.task == task]
        predictions = predict_cached(model, states, task_indices, config.device, config.batch_size)
        targets = [labels[index] for index in task_indices]
        task_accuracy[task] = accuracy_figures(targets, predictions)["accuracy"]
        task_targets += targets
        task_predictions += predictions
        report(f"held-out task {task:22s} ({LABELS[targets[0]]:5s}, n={len(targets):3d}): accuracy {task_accuracy[task]:.3f}")
    model.load_state_dict(final_state, strict=False)

    summary = {
        "encoder": config.encoder,
        "pooling": model.pooling,
        "prompts_per_task": dict(Counter(prompt.task for prompt in prompts)),
        "train_prompts": len(train_indices),
        "held_out_prompts": len(held_out_indices),
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
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


def format_confusion_matrix(matrix: Sequence[Sequence[int]]) -> str:
    """Rows: true label; columns: predicted label."""
    width = max(len(label) for label in LABELS) + 2
    lines = ["true \\ predicted".ljust(18) + "".join(label.rjust(width) for label in LABELS)]
    for label, row in zip(LABELS, matrix):
        lines.append(label.ljust(18) + "".join(str(count).rjust(width) for count in row))
    return "\n".join(lines)
