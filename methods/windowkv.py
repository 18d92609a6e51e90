"""WindowKV (Zuo et al., 2025), after the optim996/WindowKV reference (`models/compress_utils.py`).

What it does. During prefill, per layer, the last ``α`` prompt tokens (the
suffix) are always kept and the ``L_r = prompt_length - α`` tokens before them
are *reviewable*. If ``L_r`` fits the layer's budget ``B`` nothing is dropped.
Otherwise the suffix queries score every reviewable token (softmax of the
suffix queries over all keys, logits scaled by 1/sqrt(head_dim), causal mask
only inside the suffix, summed over the suffix queries), the reviewable tokens
are cut into consecutive windows of ``review_window_size`` tokens from token 0
(the last one may be shorter), each window gets one score shared by every head,
and the ``ceil((L_r - B) / review_window_size)`` lowest-scoring windows are
dropped; the rest are kept whole, with the suffix. The strategy follows the task
type: ``qa`` (information localisation: single/multi-doc QA) scores a window by
the mean of its top ``review_window_size // 2`` token scores per head, then the
mean over heads ("max"), with ``α = suffix_max``; ``other`` (aggregation:
summaries, few-shot, synthetic, code) by the mean over heads and tokens
("average"), with ``α = suffix_avg``. The task type comes from ``--task-type``
or, with ``auto``, from the task classifier (`kvbench.classifier`).

Layers are cut into groups of ``shared_layers`` consecutive layers. Only a
group's first layer scores; the other layers of the group keep the positions it
chose (the saving the paper claims). Group budgets fall arithmetically:
``last = M*S // beta``, ``first = 2M - last``, ``step = (first - last) // (G - 1)``,
budgets ``first, first - step, ..., last`` (M = --capacity, S = shared layers,
G = groups); Llama-3-8B with S = 8 and M = 512 gets 732, 586, 440, 292. ``B``
counts reviewable tokens only; the suffix comes on top, as in the reference.
Dropping whole windows keeps ``L_r`` minus the dropped windows' lengths, so a
layer holds at most ``B`` reviewable tokens when the dropped windows are full
and up to ``review_window_size - 1`` fewer; when the shorter last window is among
the dropped ones it can hold a few more than ``B`` (the reference's arithmetic).
Decoding appends without eviction.

Where we differ from, or decide beyond, the reference:

* Layer counts not divisible by ``shared_layers`` (the reference sizes its
  budget list ``(layers // S) * S`` and crashes with an IndexError past it, e.g.
  SmolLM2's 30 layers or Qwen2.5-7B's 28 with S = 8): we use
  ``G = ceil(layers / S)`` groups, the last one shorter. The leader rule stays
  the reference's (layer ``i`` leads when ``i % S == 0``) and the budget formula
  is unchanged, so the shorter last group has the smallest budget and the mean
  budget per layer is a little above the capacity (M = 512: 527.2 per layer on
  30 layers, 544 on 28). The per-group budgets are written to every result row.
* Bad settings fail with a one-line error: non-positive window, group, suffix
  sizes or beta at construction; a capacity too small to give every group a
  positive budget (``capacity * S // beta >= 1``, i.e. ``capacity >=
  ceil(beta / S)``, and ``S < 2 * beta``) as soon as the layer count is known
  (``prepare``, from the model's config, before its weights load). The reference runs on with
  zero or negative budgets, keeping only the suffix.
* ``shared_layers >= layers`` (one group): the reference divides by zero
  (G = 1) or indexes an empty list (G = 0). We give the single group the
  capacity itself: with one group there is nothing to decay over, and the mean
  budget stays ``M``. Layer 0 scores, every other layer reuses its choice.
* Ties between window scores: like the reference's stable ``sorted(...,
  reverse=True)[:-k]``, among equal scores the later window is dropped first.
* The task type is classified for **every** sample; the reference sets the
  strategy (and the suffix size) on the model config at the first sample and
  never changes it.
* Under GQA the cache holds un-repeated KV heads (the reference repeats them
  before compressing: 4x the memory on Llama-3-8B). Scores are taken over the
  query heads, as the reference's repeated layout gives, and the window choice is
  shared by all heads anyway, so every KV head keeps the same positions.
* Kept windows are stored in their original order; the reference concatenates
  them in descending-score order. Keys are post-RoPE, so attention does not
  depend on the cache order; only the summation order of the attention output
  differs.
* A group leader that drops every window (possible only when the budget is
  smaller than a window) records that for its followers, which keep the suffix
  only. The reference does not update its shared window list then, so the
  followers reuse a stale list from an earlier group or sample.
* ``review_window_size = 1``: the reference averages the top ``1 // 2 = 0``
  tokens (NaN scores); we average at least one token.
* Group decisions live in the sample's own state, so samples never share them;
  a follower whose leader has not chosen (never expected from the engine)
  scores by itself instead of reusing stale positions.

Numerics match the reference: logits in the model dtype, softmax in float32
cast back to the model dtype, summed over the suffix in the model dtype, and
each window scored by the very reduction the reference's ``get_window_score``
runs: ``.mean()`` (after a per-head ``topk`` for "max") of the strided
``(1, H, w)`` view of the votes, one window at a time, in the model dtype. The
rounded result of a reduction depends on the order of its additions, hence on
the layout it reads, so reducing the windows in any other layout (as kvbench
did before: a contiguous token-major copy of all windows) rounds exactly tied
windows apart and drops other windows than the reference (17 tokens kept
instead of 15 on an 18-token, 32-query-head prompt with windows of 3).
`tests/test_windowkv.py` checks the kept positions against a restatement of the
reference's loop in fp32, bf16 and fp16, and, layer by layer, on a real trec
prompt through the embedded SmolLM2.

On SmolLM2-135M the few-shot tasks (trec, triviaqa) score near zero at
``--capacity 128`` where SnapKV keeps some of FullKV's score. That is the
method, not this implementation (the kept positions are the reference's): the
first group's leader, layer 0, attends locally, so layers 1-7 keep windows
holding only 41-49% of their own suffix attention (SnapKV's per-layer choice:
72-78%), and one window choice shared by all heads drops the scattered label
tokens the model copies (trec "Description" instead of "Description of
something").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.errors import KvbenchError
from kvbench.methods import register
from kvbench.methods.base import (Compressor, LayerPrefill, Method, ModelInfo, SampleCompression, Selection,
                                  keep_positions, option, require_capacity, require_positive)
from kvbench.methods.scoring import observation_window_attention

TASK_TYPES = ("qa", "other")
STRATEGY = {"qa": "max", "other": "average"}


def num_groups(num_layers: int, shared_layers: int) -> int:
    """Groups of ``shared_layers`` consecutive layers; the last one may be shorter."""
    return math.ceil(num_layers / shared_layers)


def group_budgets(capacity: int, shared_layers: int, beta: int, num_layers: int) -> list[int]:
    """Reviewable-token budget of each layer group, the reference's "arithmetic" decay.

    Raises KvbenchError when a group would get no positive budget.
    """
    groups = num_groups(num_layers, shared_layers)
    if groups == 1:
        return [capacity]
    if shared_layers >= 2 * beta:
        raise KvbenchError(
            f"--shared-layers ({shared_layers}) must be below 2 x --beta ({2 * beta}) for a {num_layers}-layer model "
            f"({groups} groups): the first group's budget 2*capacity - capacity*shared_layers//beta is never positive"
        )
    last = capacity * shared_layers // beta
    first = 2 * capacity - last
    step = (first - last) // (groups - 1)
    budgets = [first - index * step for index in range(groups - 1)] + [last]
    if min(budgets) <= 0:
        needed = math.ceil(beta / shared_layers)
        raise KvbenchError(
            f"--capacity {capacity} is too small for WindowKV on a {num_layers}-layer model with "
            f"--shared-layers {shared_layers} and --beta {beta}: the last group's budget "
            f"capacity*{shared_layers}//{beta} is {last}; needs --capacity >= {needed}"
        )
    return budgets


def window_scores(votes: torch.Tensor, window_size: int, strategy: str) -> torch.Tensor:
    """One score per review window, shared by all heads: (num_windows,), in the votes' dtype.

    votes: (1, H, L_r) per-head token scores (a contiguous tensor, as the
    reference's ``attn_weights_sum``). "average": mean over heads and the window's
    tokens. "max": per head the top ``min(window_size // 2, window length)``
    tokens (at least one), then the mean of those ``H x top`` values.

    Each window is reduced exactly as the reference's ``get_window_score`` does:
    the strided ``(1, H, w)`` view of the votes (``votes[:, :, start:end]``;
    ``split`` makes the same views), ``.mean()`` over it for "average",
    ``torch.topk`` along its tokens then ``.mean()`` of the ``(1, H, top)`` values
    for "max", one window at a time, in the votes' dtype. A mean is a float
    sum (fp32 accumulation, rounded to bf16/fp16 for half votes) whose rounding
    depends on the order of the additions, which the kernel picks from the
    tensor's layout and shape, so reducing any other
    layout (a contiguous token-major copy, or all windows in one batched call)
    can round exactly tied windows apart, or untied ones together, and drop
    other windows than the reference (e.g. 17 tokens kept instead of 15 on an
    18-token prompt with 32 query heads and windows of 3). The loop costs one
    small reduction per window per group leader and no host sync
    (about 5-20 us a window on a CPU).
    """
    if strategy != "max":
        return torch.stack([window.mean() for window in votes.split(window_size, dim=-1)])  # strided views
    top = max(1, window_size // 2)
    full_windows = votes.shape[-1] // window_size
    # The full windows' top values in one topk: selections, so the same values in the same (descending) order
    # as each window's own topk gives, laid out window-major so that every window's (1, H, top) block has the
    # layout the reference's topk returns, and its mean reduces in the same order. One call instead of one a
    # window halves the small operations of the loop (the cost of a grid's WindowKV on a GPU).
    tops = (votes[..., : full_windows * window_size].unflatten(-1, (full_windows, window_size))
            .topk(min(top, window_size)).values.permute(2, 0, 1, 3).contiguous())
    scores = [window_means(tops)] if full_windows else []
    rest = votes[..., full_windows * window_size:]
    if rest.shape[-1]:
        scores.append(rest.topk(min(top, rest.shape[-1])).values.mean().view(1))
    return torch.cat(scores)


def _each_mean(blocks: torch.Tensor) -> torch.Tensor:
    return torch.stack([block.mean() for block in blocks.unbind(0)])


#: per (shape, dtype, device) of the blocks: a CUDA graph of `_each_mean`, its input and its output
_WINDOW_MEAN_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
#: shapes kept at most: prompts of one length (most of a benchmark's, truncated to the context) reuse one
WINDOW_MEAN_GRAPHS_KEPT = 8


def window_means(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks.mean()`` of each block along the first dimension, one reduction a block as the reference reduces
    each window (see `window_scores`). On CUDA the hundreds of small reductions of a leader layer run as one CUDA
    graph, captured once per shape: the same kernels with the same launch settings, so the same bits, without
    a host launch each (most of a grid's WindowKV cost on a GPU)."""
    if not blocks.is_cuda:
        return _each_mean(blocks)
    key = (tuple(blocks.shape), blocks.dtype, blocks.device)
    if key not in _WINDOW_MEAN_GRAPHS:
        if len(_WINDOW_MEAN_GRAPHS) >= WINDOW_MEAN_GRAPHS_KEPT:
            del _WINDOW_MEAN_GRAPHS[next(iter(_WINDOW_MEAN_GRAPHS))]
        static = blocks.clone()
        stream = torch.cuda.Stream(blocks.device)
        stream.wait_stream(torch.cuda.current_stream(blocks.device))
        with torch.cuda.stream(stream):
            _each_mean(static)  # warm-up outside the capture
        torch.cuda.current_stream(blocks.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            means = _each_mean(static)
        _WINDOW_MEAN_GRAPHS[key] = graph, static, means
    graph, static, means = _WINDOW_MEAN_GRAPHS[key]
    static.copy_(blocks)
    graph.replay()
    return means.clone()  # the next replay writes over it


def review_window_scores(layer: LayerPrefill, suffix: int, window_size: int, strategy: str) -> torch.Tensor:
    """The score of each review window of the tokens before the last ``suffix`` (`window_scores`), voted by the
    suffix's queries: their attention summed over the suffix, per query head as the reference sums it."""
    attention = observation_window_attention(layer.queries, layer.keys, suffix).to(layer.queries.dtype)
    votes = attention[..., : layer.prompt_length - suffix].sum(dim=-2)  # (1, Hq, L_r)
    return window_scores(votes, window_size, strategy)


def window_ranking(scores: torch.Tensor) -> torch.Tensor:
    """The windows best first; among equal scores the earlier first (the reference's stable descending sort)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def kept_windows(ranking: torch.Tensor, drop: int) -> torch.Tensor:
    """Indices (ascending) of the windows kept after dropping the ``drop`` lowest-ranked ones of ``ranking``
    (`window_ranking`: among equal scores the later window is dropped first, the reference's stable descending
    sort cut from the end)."""
    return ranking[: ranking.shape[0] - drop].sort().values


def _review_window_ranking(layer: LayerPrefill, suffix: int, window_size: int, strategy: str
                           ) -> tuple[torch.Tensor, int]:
    """`window_ranking` of the layer's `review_window_scores`, and the rank of the last window (the number of
    windows when it is whole), for every capacity of a grid: the rank of a partial last window is read on the
    host once a layer instead of each capacity cutting its positions by a mask (a wait for the device each)."""
    ranking = window_ranking(review_window_scores(layer, suffix, window_size, strategy))
    windows = ranking.shape[0]
    whole = (layer.prompt_length - suffix) % window_size == 0
    return ranking, windows if whole else int((ranking == windows - 1).int().argmax())


@register
@dataclass(frozen=True, kw_only=True)
class WindowKV(Method):
    name = "windowkv"
    description = (
        "Keep whole windows of the prompt chosen by the last prompt tokens' attention, task-adaptive scoring, "
        "layers in groups sharing one choice, budgets decreasing by group."
    )

    capacity: int | None = option(None, "average reviewable tokens kept per layer (the suffix comes on top)")
    review_window_size: int = option(8, "tokens per review window (the unit kept or dropped)")
    shared_layers: int = option(8, "consecutive layers per group sharing the first layer's choice")
    suffix_max: int = option(32, "suffix (scoring queries, always kept) for QA tasks ('max' scoring)")
    suffix_avg: int = option(16, "suffix (scoring queries, always kept) for other tasks ('average' scoring)")
    beta: int = option(14, "the last group keeps capacity*shared_layers//beta reviewable tokens")
    task_type: str = option("auto", "scoring strategy: qa ('max'), other ('average'), or auto (the task classifier, "
                                    "per sample)", choices=("auto", "qa", "other"))
    classifier: str | None = option(None, "task classifier checkpoint for --task-type auto (default location if unset)")

    def validate(self) -> None:
        require_capacity(self)
        require_positive(self, "review_window_size", "shared_layers", "suffix_max", "suffix_avg", "beta")
        if self.classifier is not None and self.task_type != "auto":
            raise KvbenchError(f"--classifier is read only with --task-type auto, not with --task-type {self.task_type}")

    def prepare(self, model: ModelInfo, shared: dict[Any, Any] | None = None) -> WindowKVCompressor:
        return WindowKVCompressor(self, model, {} if shared is None else shared)


class SampleClassifier:
    """A task classifier shared by a grid's WindowKV configurations: the grid prefills a sample once for
    all of them, one after another, so the last answer is kept and each sample is classified once."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.digest = classifier.digest
        self._last: tuple[str, str] | None = None

    def predict(self, text: str) -> str:
        if self._last is None or self._last[0] != text:
            self._last = (text, self.classifier.predict(text))
        return self._last[1]


class WindowKVCompressor(Compressor):
    """WindowKV bound to a model: its group budgets (checked for the layer count) and, for auto, the classifier."""

    method: WindowKV

    def __init__(self, method: WindowKV, model: ModelInfo, shared: dict[Any, Any]):
        super().__init__(method, model)
        self.budgets = group_budgets(method.capacity, method.shared_layers, method.beta, model.num_layers)
        self.task_classifier = None
        if method.task_type == "auto":
            # Loaded now, so that a missing checkpoint fails before any model work.
            from kvbench.classifier import load_classifier

            key = ("windowkv classifier", method.classifier)
            if key not in shared:
                shared[key] = SampleClassifier(load_classifier(method.classifier))
            self.task_classifier = shared[key]

    def identity(self) -> dict[str, Any]:
        # the digest of the very bytes loaded, so the run records the classifier it used
        return {} if self.task_classifier is None else {"classifier": self.task_classifier.digest}

    def start_sample(self, prompt_length: int, sample: dict | None = None) -> WindowKVSample:
        method = self.method
        if method.task_type != "auto":
            return WindowKVSample(self, method.task_type)
        text = (sample or {}).get("prompt_text")
        if text is None:
            raise KvbenchError("--task-type auto needs the sample's prompt text for the classifier; pass --task-type qa|other")
        predicted = self.task_classifier.predict(text)
        if predicted not in TASK_TYPES:
            raise KvbenchError(f"the task classifier answered {predicted!r}, expected one of {', '.join(TASK_TYPES)}")
        return WindowKVSample(self, predicted)


class WindowKVSample(SampleCompression):
    """One sample: its task type, and the positions each group leader chose for its followers."""

    method: WindowKV

    def __init__(self, compressor: WindowKVCompressor, task_type: str):
        super().__init__(compressor.method)
        self.task_type = task_type
        self.budgets = compressor.budgets
        #: group -> reviewable positions its leader kept (None: every window dropped)
        self.group_choice: dict[int, torch.Tensor | None] = {}

    def record(self) -> dict[str, Any]:
        return {"task_type": self.task_type, "group_budgets": list(self.budgets)}

    @property
    def suffix(self) -> int:
        return self.method.suffix_max if self.task_type == "qa" else self.method.suffix_avg

    def select(self, layer: LayerPrefill) -> Selection | None:
        method = self.method
        group = layer.layer_idx // method.shared_layers
        budget = self.budgets[group]
        length = layer.prompt_length
        suffix = self.suffix
        reviewable = length - suffix
        if reviewable <= budget:
            return None
        # The leader chooses; a follower whose leader left no choice (never expected from the engine) chooses itself.
        if layer.layer_idx % method.shared_layers == 0 or group not in self.group_choice:
            self.group_choice[group] = self._choose(layer, reviewable, budget, suffix)
        kept = self.group_choice[group]
        suffix_positions = torch.arange(reviewable, length, device=layer.keys.device)
        positions = suffix_positions if kept is None else torch.cat([kept.to(layer.keys.device), suffix_positions])
        return keep_positions(positions, layer.keys.shape[1], ascending=True)  # kept windows, then the suffix

    def _choose(self, layer: LayerPrefill, reviewable: int, budget: int, suffix: int) -> torch.Tensor | None:
        """Reviewable positions (ascending) the group keeps, or None when every window is dropped."""
        window = self.method.review_window_size
        num_windows = math.ceil(reviewable / window)
        drop = math.ceil((reviewable - budget) / window)
        if drop >= num_windows:
            return None
        # the same at every capacity: a grid's WindowKV configurations score and rank each leader layer once
        ranking, last_window_rank = layer.shared(_review_window_ranking, suffix, window, STRATEGY[self.task_type])
        windows = kept_windows(ranking, drop)
        positions = (windows.view(-1, 1) * window + torch.arange(window, device=windows.device)).flatten()
        if last_window_rank < num_windows - drop:  # a kept partial last window, the last kept, ends at the reviewable end
            return positions[: positions.shape[0] - (num_windows * window - reviewable)]
        return positions
