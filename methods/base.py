"""What a compression method is: a small configured object the cache hook consults.

The hook (`kvbench.harness.hook`) calls a method at two moments:

* ``select(layer)`` once per layer during prefill, right after that layer's
  attention ran over the whole prompt. The method sees the layer's post-RoPE
  queries and keys/values (keys and values *un-repeated*, one per KV head) and
  answers which positions each KV head keeps (a `Selection`), or ``None`` to keep
  everything. The hook gathers the kept keys/values into the cache before the next
  layer runs, so the full cache of all layers never exists at once.
* ``decode_eviction(layer_idx, cache_length, tokens_seen)`` before each decoding
  step appends a token; methods that hold the cache at a fixed size while
  decoding (PrefixKV, Elastic Cache) return the cache index to drop.

Two optional hooks, no-ops by default:

* ``bind_model(model_name, num_layers)`` once, after the model is loaded and
  before the first sample (``model_name``: the run's short model name,
  `LoadedModel.name`); PrefixKV finds and checks its per-model profile here.
* A scoring pre-pass, for methods with ``needs_scoring_pass`` true (PrefixKV
  ``--prefix-config online``: its per-layer budgets need every layer's scores
  before the first layer is compressed): after ``start_sample`` and before the
  real prefill, the engine runs the prompt once more through the model without
  storing any cache and calls ``observe(layer)`` for every layer instead of
  ``select``. Prefill hidden states do not depend on what is stored, so the
  real prefill then sees the same layers.

Per-sample state (a task type, per-layer budgets found by a search, positions a
group leader chose) is reset in ``start_sample`` and reported through
``sample_record`` into the run's JSONL row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class Option:
    """One tunable of a method; becomes ``--<name with dashes>`` on `kvbench run`."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None


@dataclass
class LayerPrefill:
    """Everything a method may look at for one layer after its prefill attention.

    Shapes (batch is always 1):
      queries: (1, num_query_heads, prompt_length, head_dim), post-RoPE.
      keys, values: (1, num_kv_heads, prompt_length, head_dim), post-RoPE keys, un-repeated.
    """

    layer_idx: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float

    @property
    def prompt_length(self) -> int:
        return self.keys.shape[-2]

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass
class Selection:
    """Positions each KV head keeps, and optionally merged keys/values for them.

    indices: (1, num_kv_heads, kept) long tensor of prompt positions, ascending per head.
    keys, values: when given (Elastic Cache's merge), the tensors to store for those
      positions, shape (1, num_kv_heads, kept, head_dim); otherwise the hook gathers
      the original keys/values at ``indices``.
    """

    indices: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


def keep_positions(positions: torch.Tensor, num_kv_heads: int) -> Selection:
    """A Selection keeping the same 1-D list of positions in every KV head."""
    positions = positions.sort().values
    return Selection(indices=positions.view(1, 1, -1).expand(1, num_kv_heads, -1).contiguous())


class Method:
    """Base class: subclasses set ``name``, ``description`` and ``options``."""

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    #: whether the method needs a token budget (``--capacity``) at all
    needs_capacity: ClassVar[bool] = True
    #: whether the engine must run a scoring pre-pass calling ``observe`` (may be set per instance)
    needs_scoring_pass: ClassVar[bool] = False

    def __init__(self, capacity: int | None = None, **options: Any):
        self.capacity = capacity
        known = {option.name: option for option in self.options}
        unknown = set(options) - set(known)
        if unknown:
            raise KvbenchError(f"method {self.name!r} has no option(s) {', '.join(sorted(unknown))}")
        for option in self.options:
            value = options.get(option.name)
            if value is None:
                value = option.default
            if option.choices is not None and value not in option.choices:
                raise KvbenchError(
                    f"--{option.name.replace('_', '-')} must be one of {', '.join(map(str, option.choices))}, got {value!r}"
                )
            setattr(self, option.name, value)
        if self.needs_capacity and (capacity is None or capacity <= 0):
            raise KvbenchError(f"method {self.name!r} needs --capacity > 0, got {capacity}")
        self.validate()

    def validate(self) -> None:
        """Raise KvbenchError for option values that cannot work together."""

    def settings(self) -> dict[str, Any]:
        """The configuration recorded in a run's `run.json`."""
        return {"capacity": self.capacity, **{option.name: getattr(self, option.name) for option in self.options}}

    def budget_label(self) -> str:
        """How the run folder names this method's budget ("512"); empty when it has none."""
        return "" if self.capacity is None else str(self.capacity)

    def non_default_options(self) -> dict[str, Any]:
        """Options set away from their defaults, named in the run folder so variants never share one."""
        return {o.name: getattr(self, o.name) for o in self.options if getattr(self, o.name) != o.default}

    def bind_model(self, model_name: str, num_layers: int) -> None:
        """Called once with the loaded model's short name and layer count, before the first sample."""

    def start_sample(self, prompt_length: int, num_layers: int, sample: dict | None = None) -> None:
        """Reset per-sample state before the sample's prefill."""

    def observe(self, layer: LayerPrefill) -> None:
        """Scoring pre-pass (only when ``needs_scoring_pass``): see one layer; nothing is stored."""

    def select(self, layer: LayerPrefill) -> Selection | None:
        """Positions to keep in this layer, or None to keep the whole prompt."""
        raise NotImplementedError

    def decode_eviction(self, layer_idx: int, cache_length: int, tokens_seen: int) -> int | None:
        """Cache index to drop before appending a decoded token, or None to just append."""
        return None

    def sample_record(self) -> dict[str, Any]:
        """Extra per-sample fields for the run's JSONL row (e.g. the task type used)."""
        return {}


def option_values(method_class: type[Method]) -> dict[str, Any]:
    """Default option values of a method class, for listings."""
    return {option.name: option.default for option in method_class.options}

