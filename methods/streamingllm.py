"""StreamingLLM (Xiao et al., 2024), as KVCache-Factory runs it on LongBench.

What it keeps: the first ``sink_size`` prompt tokens (the attention sinks) and the most recent
``capacity - sink_size`` prompt tokens, the same positions in every KV head and every layer. No
attention score is computed. ``--capacity`` counts the sinks. Decoding appends (nothing is
evicted, and no rolling window is kept while decoding).

LongBench defaults, those of the reference's ``run_longbench.py`` since 2024-07-10: 4 sinks (it sets
``window_size = max_capacity_prompts - 4``, the recent part); ``--capacity`` is the reference's
``max_capacity_prompts`` (its default 512; the PyramidKV paper used 128 and 2048).

Where it follows the reference (``StreamingLLMKVCluster`` of ``pyramidkv/pyramidkv_utils.py``, the
same in substance since 2024-06):

* compresses when the prompt is at least the capacity long (``q_len >= capacity``); a shorter prompt
  is kept whole; at exactly the capacity every token is kept;
* keeps positions ``0 .. sink_size - 1`` and ``L - (capacity - sink_size) .. L - 1``, sinks first,
  then the recent tokens, both in position order (so ascending, as kvbench stores them);
* keys are stored post-RoPE at their original positions (the sinks are not re-positioned next to
  the recent tokens, unlike the StreamingLLM paper's rolling cache), and decoding continues at the
  original positions;
* GQA: selection is by position, so the reference's ``query_head`` and ``kv_head`` layouts keep the
  same tokens; the cache holds un-repeated KV heads.

Where it differs:

* the option is the sink count (``--sink-size``), not the reference's ``window_size`` (the recent
  count, ``capacity - sinks``), so that one setting means the same thing at every capacity. The class
  defaults of the reference (window 64, capacity 320: 256 "sinks") are never used on LongBench.
* history not reproduced by default: from 2024-06-14 to 2024-07-10 (the era of the PyramidKV
  paper's Table 1) ``run_longbench.py`` set window 32 for StreamingLLM, which kept the first
  ``capacity - 32`` tokens plus the last 32; ``--sink-size C-32`` at ``--capacity C`` reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Method, Selection, keep_positions, option, require_capacity_beyond

CAPACITY_HELP = "tokens kept per layer per KV head, sinks included"


def sinks_and_recent(prompt_length: int, capacity: int, sink_size: int, device=None) -> torch.Tensor:
    """Positions 0..sink_size-1 and the last capacity - sink_size (needs prompt_length >= capacity)."""
    sinks = torch.arange(0, sink_size, device=device)
    recent = torch.arange(prompt_length - (capacity - sink_size), prompt_length, device=device)
    return torch.cat([sinks, recent])


@register
@dataclass(frozen=True, kw_only=True)
class StreamingLLM(Method):
    name = "streamingllm"
    description = "Keep the first tokens (attention sinks) and the most recent ones (same budget every layer, no scores)."

    capacity: int | None = option(None, CAPACITY_HELP)
    sink_size: int = option(4, "attention sinks: first prompt tokens, always kept")

    def validate(self) -> None:
        require_capacity_beyond(self, "sink_size", "the attention sinks")

    def select(self, layer: LayerPrefill) -> Selection | None:
        # The reference compresses when the prompt is at least the capacity long.
        if layer.prompt_length < self.capacity:
            return None
        positions = sinks_and_recent(layer.prompt_length, self.capacity, self.sink_size, layer.keys.device)
        return keep_positions(positions, layer.keys.shape[1], ascending=True)
