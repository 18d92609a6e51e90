"""Full cache: the uncompressed baseline every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Method, Selection


@register
@dataclass(frozen=True, kw_only=True)
class FullKV(Method):
    name = "fullkv"
    description = "Keep every prompt token (the uncompressed baseline)."

    def select(self, layer: LayerPrefill) -> Selection | None:
        return None
