"""PyramidKV (Cai et al., 2024), as KVCache-Factory implements it.

SnapKV's selection with budgets that shrink linearly from the lowest layer to
the highest, averaging to the capacity. With ``P = capacity - window`` prefix
tokens per layer on average: the top layer keeps ``P // beta``, the bottom
layer ``2P - P // beta``, steps of ``(bottom - top) // (layers - 1)``. When the
bottom budget would exceed the prompt's prefix it is clipped to the prefix and
the top raised to keep the average; prompts shorter than ``2P`` tokens fall back to
SnapKV's uniform budget, as the reference does (it compares the prompt length, window
included, with ``2P``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Selection, option
from kvbench.methods.scoring import keep_top_prefix_and_window
from kvbench.methods.snapkv import ObservationWindowMethod, pooled_window_votes


def pyramid_prefix_budget(capacity: int, window: int, beta: int, layer_idx: int, num_layers: int, prompt_length: int) -> int:
    """Prefix tokens layer ``layer_idx`` keeps (window excluded), the reference's arithmetic."""
    average = capacity - window
    if prompt_length < 2 * average:
        return average
    top = average // beta
    bottom = 2 * average - top
    if bottom >= prompt_length - window:
        bottom = prompt_length - window
        top = 2 * average - bottom
    step = (bottom - top) // (num_layers - 1) if num_layers > 1 else 0
    return bottom - layer_idx * step


@register
@dataclass(frozen=True, kw_only=True)
class PyramidKV(ObservationWindowMethod):
    name = "pyramidkv"
    description = "SnapKV's selection with per-layer budgets decreasing from low to high layers (pyramid)."

    beta: int = option(20, "top layer keeps 1/beta of the average prefix budget")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise KvbenchError(f"--beta must be > 0, got {self.beta}")

    def select(self, layer: LayerPrefill) -> Selection | None:
        if layer.prompt_length < self.capacity:
            return None
        budget = pyramid_prefix_budget(
            self.capacity, self.window_size, self.beta, layer.layer_idx, layer.num_layers, layer.prompt_length
        )
        votes = layer.shared(pooled_window_votes, self.window_size, self.kernel_size, self.pooling)
        return keep_top_prefix_and_window(votes, budget, layer.prompt_length)
