"""What PrefixKV and Elastic Cache share: budgets, protected tokens, fixed-point eviction.

Budgets. Give exactly one of
  ``--ratio R`` (0 <= R < 1): the fraction of the prompt dropped:
      ``round(R * L * layers)`` over all layers (PrefixKV), and per layer as each
      reference rounds it (Elastic Cache truncates ``L - L * (1 - R)``);
  ``--capacity C``: C prompt tokens kept per layer on average, i.e. per sample
      ``R = 1 - C / L``; worked out in integers (``L - C`` per layer,
      ``(L - C) * layers`` in all) so both flags reach the same code and agree
      exactly. ``C >= L`` means no compression for that sample.
The first ``start_size`` and last ``protect_size`` prompt tokens are never
dropped, so a layer drops at most ``L - start_size - protect_size`` tokens; a
larger budget is clipped to that (the sample's record shows what was kept).

Fixed-point elimination while decoding (both references): each new token
beyond the layer's size evicts the cached entry at a fixed index
``kept + distance`` (``kept``: the layer's kept prompt length; ``distance < 0``,
default -25), or at ``distance`` itself when it is positive. The reference falls
back to ``kept // 2`` when the index would be below 1; we use the same fallback
when a positive distance is not inside the kept prompt (the reference would
then cut a token it had just appended, or fail). The net effect: the
compressed prompt up to the index stays, and the last ``-distance`` cache
entries slide like a window over the newest tokens.

The size the cache is held at:
  with ``--ratio``: ``(1 - R_l) * tokens seen`` as in the references, where
      ``R_l = dropped_l / L`` is what the layer dropped at prefill. The
      reference's rule, ``int(len_after_append - seen_after_append * (1 - R_l)) > 0``,
      is evaluated exactly in integers: evict iff
      ``cache_length * L >= (tokens_seen + 1) * kept_l``, so the cache grows by
      ``1 - R_l`` per decoded token;
  with ``--capacity``: at ``kept_l`` (C per layer on average): every decoded
      token evicts one entry and the cache size is constant.
``--no-decode-evict`` appends instead, as every other method does.

Question-agnostic runs (`kvbench run --question-agnostic`): the context is compressed,
then the question's tokens join every layer's cache whole. Decoding counts them as kept
prompt tokens: ``kept_l`` and ``L`` above both include them, so the cache is held at the
size it has after the question (``--capacity``), the fixed index is that size plus
``distance``, and the window of the newest entries slides over the question's end as it
slides over the protected end of a prompt compressed with its question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, SampleCompression, option


def round_half_up(value: float) -> int:
    return int(value + 0.5)


@dataclass(frozen=True, kw_only=True)
class FixedPointMethod(Method):
    """The options PrefixKV and Elastic Cache share, their budgets, and their validation."""

    capacity: int | None = option(None, "prompt tokens kept per layer on average (give --capacity or --ratio)")
    ratio: float | None = option(None, "fraction of the prompt dropped, 0 <= R < 1 (give --ratio or --capacity)")
    distance: int = option(-25, "decoding evicts cache index kept_prompt_len + distance (< 0) or distance itself (> 0)")
    decode_evict: bool = option(True, "hold the cache at its budget while decoding (fixed-point elimination)")
    start_size: int = option(4, "first prompt tokens always kept")
    protect_size: int = option(1, "last prompt tokens always kept")

    def validate(self) -> None:
        if (self.ratio is None) == (self.capacity is None):
            raise KvbenchError(
                f"method {self.name!r} needs exactly one of --ratio (fraction dropped) or --capacity "
                f"(tokens kept per layer), got {'both' if self.ratio is not None else 'neither'}"
            )
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise KvbenchError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.capacity is not None and self.capacity <= 0:
            raise KvbenchError(f"--capacity must be > 0, got {self.capacity}")
        if self.distance == 0:
            raise KvbenchError("--distance must not be 0 (negative: offset from the kept prompt's end; positive: cache index)")
        if self.start_size < 0 or self.protect_size < 0:
            raise KvbenchError(f"--start-size and --protect-size must be >= 0, got {self.start_size} and {self.protect_size}")

    # -- budgets -------------------------------------------------------------------------

    def middle_size(self, prompt_length: int) -> int:
        """Prompt tokens that may be dropped in one layer."""
        return max(0, prompt_length - self.start_size - self.protect_size)

    def compresses(self, prompt_length: int) -> bool:
        """Whether this sample is compressed at all (capacity >= prompt length or ratio 0: no)."""
        if self.capacity is not None:
            return self.capacity < prompt_length and self.middle_size(prompt_length) > 0
        return self.ratio > 0 and self.middle_size(prompt_length) > 0

    def ratio_drop(self, prompt_length: int) -> int:
        """Tokens ``--ratio`` drops from one layer of a prompt (each method rounds as its reference does)."""
        return round_half_up(self.ratio * prompt_length)

    def total_drop(self, prompt_length: int, num_layers: int) -> int:
        """Prompt tokens dropped over all layers, clipped to what the protected tokens leave."""
        if not self.compresses(prompt_length):
            return 0
        if self.capacity is not None:
            wanted = (prompt_length - self.capacity) * num_layers
        else:
            wanted = round_half_up(self.ratio * prompt_length * num_layers)
        return min(wanted, self.middle_size(prompt_length) * num_layers)

    def layer_drop(self, prompt_length: int) -> int:
        """Prompt tokens dropped in each layer under a uniform budget."""
        if not self.compresses(prompt_length):
            return 0
        wanted = prompt_length - self.capacity if self.capacity is not None else self.ratio_drop(prompt_length)
        return min(wanted, self.middle_size(prompt_length))

    def eviction_index(self, kept: int) -> int:
        """The fixed cache index evicted while decoding, for a layer that kept ``kept`` prompt tokens."""
        index = kept + self.distance if self.distance < 0 else self.distance
        if index < 1 or index >= kept:
            index = kept // 2
        return index


class FixedPointSample(SampleCompression):
    """One sample of a fixed-point method: its per-layer kept counts and the decode-time eviction rule."""

    def __init__(self, method: FixedPointMethod, prompt_length: int, num_layers: int):
        super().__init__(method)
        self.prompt_length = prompt_length
        self.num_layers = num_layers
        #: prompt tokens each layer keeps; None until the budgets are known (PrefixKV online: after the pre-pass)
        self.kept: list[int] | None = None
        #: question tokens appended whole after compression (question-agnostic runs)
        self.question_tokens = 0

    def prompt_extended(self, tokens: int) -> None:
        self.question_tokens = tokens

    def decode_eviction(self, layer_idx: int, cache_length: int, tokens_seen: int) -> int | None:
        method = self.method
        if not method.decode_evict or self.kept is None or not method.compresses(self.prompt_length):
            return None  # no eviction: uncompressed samples grow like the full cache
        kept = self.kept[layer_idx] + self.question_tokens
        if method.capacity is not None:
            over = cache_length >= kept
        else:
            over = cache_length * (self.prompt_length + self.question_tokens) >= (tokens_seen + 1) * kept
        return method.eviction_index(kept) if over else None

    def record(self) -> dict[str, Any]:
        """Per-sample JSONL fields: prompt tokens kept per layer, their mean/min/max, and the total dropped."""
        if self.kept is None:
            return {}
        kept = self.kept
        return {
            "budget_per_layer": list(kept),
            "budget_mean": sum(kept) / len(kept),
            "budget_min": min(kept),
            "budget_max": max(kept),
            "budget_dropped": self.prompt_length * len(kept) - sum(kept),
        }
