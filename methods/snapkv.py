"""SnapKV (Li et al., 2024), as KVCache-Factory implements it for LongBench.

Each KV head keeps the observation window (the last ``window_size`` prompt
tokens) plus the ``capacity - window_size`` prefix tokens that the window's
queries attend to most, after pooling the votes over neighbouring tokens.
Defaults are the reference's LongBench settings (window 8, kernel 7, max
pooling). Under GQA the scores of a KV head's query group are averaged before
pooling (the reference's kv-head layout with ``gqa_score_agg='mean'``), so the
cache holds un-repeated heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Method, Selection, option, require_capacity_beyond
from kvbench.methods.scoring import keep_top_prefix_and_window, mean_over_groups, observation_window_attention

CAPACITY_HELP = "tokens kept per layer per KV head, observation window included"


def pooled_window_votes(layer: LayerPrefill, window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's per-KV-head vote for each prefix token: (1, Hkv, prompt_length - window).

    The float32 softmax is cast back to the model dtype before summing over the
    window, exactly as the reference does, so ties and rounding match it in bf16.
    """
    attention = observation_window_attention(layer.queries, layer.keys, window).to(layer.queries.dtype)
    votes = attention[..., :-window].sum(dim=-2)
    votes = mean_over_groups(votes, layer.keys.shape[1])
    pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
    return pool(votes, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)


@dataclass(frozen=True, kw_only=True)
class ObservationWindowMethod(Method):
    """The SnapKV family's options and their validation."""

    capacity: int | None = option(None, CAPACITY_HELP)
    window_size: int = option(8, "observation window: last prompt tokens whose queries vote, always kept")
    kernel_size: int = option(7, "pooling kernel over the votes (odd)")
    pooling: str = option("maxpool", "pooling of the votes", choices=("maxpool", "avgpool"))

    def validate(self) -> None:
        require_capacity_beyond(self, "window_size", "the observation window")
        if self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            raise KvbenchError(f"--kernel-size must be a positive odd number, got {self.kernel_size}")


@register
@dataclass(frozen=True, kw_only=True)
class SnapKV(ObservationWindowMethod):
    name = "snapkv"
    description = "Keep the prefix tokens the last prompt tokens attend to most, plus that window (same budget every layer)."

    def select(self, layer: LayerPrefill) -> Selection | None:
        # The reference compresses when the prompt is at least the capacity long.
        if layer.prompt_length < self.capacity:
            return None
        votes = layer.shared(pooled_window_votes, self.window_size, self.kernel_size, self.pooling)
        return keep_top_prefix_and_window(votes, self.capacity - self.window_size, layer.prompt_length)
