"""Full cache: the uncompressed baseline every method is compared against."""

from __future__ import annotations

from kvbench.methods import register
from kvbench.methods.base import LayerPrefill, Method, Selection


@register
class FullKV(Method):
    name = "fullkv"
    description = "Keep every prompt token (the uncompressed baseline)."
    needs_capacity = False

    def __init__(self, capacity: int | None = None, **options):
        # A budget means nothing here; dropping it keeps every full-cache run in one folder.
        super().__init__(capacity=None, **options)

    def select(self, layer: LayerPrefill) -> Selection | None:
        return None
