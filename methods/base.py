"""What a compression method is: a typed configuration, and pure tensor code the engine calls.

Three objects, each with one job:

* a **Method** is the configuration: a frozen dataclass whose fields are its options,
  each declared with `option` (default, help, choices). ``validate`` only checks
  values. `kvbench run` turns every declared field into a flag and refuses a flag
  the chosen method does not declare; the fields set away from their defaults name
  the run folder, and all of them go into ``run.json``.
* ``Method.prepare(model, shared)`` gives a **Compressor**: the method bound to one model
  for one run. It loads what the run needs (a classifier, a profile), checks
  settings that depend on the model (its layer count), and reports the content
  digest of what it loaded (``identity``), so that results made with other files
  never share a run folder.
* ``Compressor.start_sample(prompt_length, sample)`` gives a **SampleCompression**:
  the state of one sample (a task type, per-layer budgets, what a group leader
  chose). The engine keeps one per sample, so samples decoded side by side never
  share state. It is called at three moments:

  - ``select(layer)`` once per layer during prefill, right after that layer's
    attention ran over the whole prompt. It sees the layer's post-RoPE queries
    and keys/values (keys and values *un-repeated*, one per KV head) and answers
    which positions each KV head keeps (a `Selection`), or ``None`` to keep
    everything. The hook stores only the kept entries before the next layer runs.
  - ``observe(layer)``, only when ``needs_scoring_pass`` is true for the sample
    (PrefixKV ``--prefix-config online``, whose per-layer budgets need every
    layer's scores before the first layer is compressed): the engine first runs
    the prompt through the model storing nothing and shows each layer here.
    Prefill hidden states do not depend on what is stored, so the real prefill
    then sees the same layers.
  - ``decode_eviction(layer_idx, cache_length, tokens_seen)`` before each decoding
    step appends a token; methods that hold the cache at a fixed size while
    decoding (PrefixKV, Elastic Cache) return the cache index to drop.
  - ``prompt_extended(tokens)``, in question-agnostic runs only: ``prompt_length``
    was the context before the question, and the question's ``tokens`` have just
    joined every layer's compressed cache whole; decode-time rules count them as
    kept prompt tokens (`kvbench.methods.fixed_point`).

  ``record()`` gives the sample's extra fields for its result row.

A method without per-sample state (SnapKV, PyramidKV, ...) only writes
``Method.select(layer)``; the default compressor and sample state call it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from kvbench.errors import KvbenchError

_OPTION_METADATA = "kvbench_option"

T = TypeVar("T")


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """Declare a method option: a dataclass field whose metadata carries its help text and choices."""
    return dataclasses.field(default=default, metadata={_OPTION_METADATA: (help, choices)})


def option_flag(name: str) -> str:
    """The command-line flag of an option: ``window_size`` -> ``--window-size``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class OptionSpec:
    """One declared option of a method, as the CLI and `kvbench methods` present it."""

    name: str
    #: the value's type (int, float, str, bool); an option may also be unset (None) when its default is None
    type: type
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return option_flag(self.name)

    def parse(self, text: str) -> Any:
        """A value given as text (``bench --methods snapkv:window_size=8``), checked against the type."""
        try:
            if self.type is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            return self.type(text)
        except ValueError:
            kind = {int: "an integer", float: "a number", bool: "true or false"}.get(self.type, "text")
            raise KvbenchError(f"{self.name} must be {kind}, got {text!r}") from None


def _value_type(annotation: Any) -> type:
    """``int`` from ``int``, ``int | None`` or ``Optional[int]``."""
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) != 1:
            raise TypeError(f"a method option has one value type, got {annotation}")
        return members[0]
    return annotation


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model: its short name (profiles are per model) and its layer count."""

    name: str
    num_layers: int


@dataclass
class LayerPrefill:
    """Everything a method may look at for one layer after its prefill attention.

    Shapes (batch is always 1):
      queries: (1, num_query_heads, prompt_length, head_dim), post-RoPE.
      keys, values: (1, num_kv_heads, prompt_length, head_dim), post-RoPE keys, un-repeated.

    Every configuration of a grid sees the same object for a layer, so a score that several of them
    rank by is computed once through `shared`.
    """

    layer_idx: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    #: what `shared` computed for this layer, by (function, arguments)
    _derived: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def shared(self, compute: Callable[..., T], *args: Hashable) -> T:
        """``compute(self, *args)``, computed once for this layer and handed to every caller asking the same:
        a method's score at every capacity of a grid, or the attention mass that H2O, Elastic Cache and PrefixKV
        all rank by. ``compute`` must depend on nothing but the layer and ``args``; callers must not modify the
        result in place."""
        key = (compute, args)
        if key not in self._derived:
            self._derived[key] = compute(self, *args)
        return self._derived[key]

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


def require_capacity(method: Method) -> None:
    """The methods with a fixed token budget need ``--capacity`` > 0."""
    if method.capacity is None or method.capacity <= 0:
        raise KvbenchError(f"method {method.name!r} needs --capacity > 0, got {method.capacity}")


def require_positive(method: Method, *option_names: str) -> None:
    """Each named option > 0."""
    for name in option_names:
        value = getattr(method, name)
        if value <= 0:
            raise KvbenchError(f"{option_flag(name)} must be > 0, got {value}")


def require_capacity_beyond(method: Method, option_name: str, what: str) -> None:
    """``--capacity`` > 0, the option (always-kept tokens: a window, sinks) > 0, and the capacity larger than it."""
    require_capacity(method)
    require_positive(method, option_name)
    value = getattr(method, option_name)
    if method.capacity <= value:
        raise KvbenchError(f"--capacity ({method.capacity}) must be larger than {what} {option_flag(option_name)} ({value})")


def keep_positions(positions: torch.Tensor, num_kv_heads: int, ascending: bool = False) -> Selection:
    """A Selection keeping the same 1-D list of positions in every KV head (sorted here unless ``ascending``
    already: a sort of thousands of positions costs a GPU dozens of kernel launches)."""
    if not ascending:
        positions = positions.sort().values
    return Selection(indices=positions.view(1, 1, -1).expand(1, num_kv_heads, -1))


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base class of a method's configuration: subclasses set ``name`` and ``description`` and declare options."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __post_init__(self) -> None:
        for spec in self.option_specs():
            value = getattr(self, spec.name)
            if value is None:
                continue
            if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, spec.name, float(value))  # --ratio 0 given as an int
            elif not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
                raise KvbenchError(f"{spec.flag} of {self.name} must be {spec.type.__name__}, got {value!r}")
            if spec.choices is not None and value not in spec.choices:
                raise KvbenchError(f"{spec.flag} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
        self.validate()

    @classmethod
    def option_specs(cls) -> tuple[OptionSpec, ...]:
        """The declared options, in declaration order."""
        hints = typing.get_type_hints(cls)
        specs = []
        for field in dataclasses.fields(cls):
            if _OPTION_METADATA not in field.metadata:
                raise TypeError(f"{cls.__name__}.{field.name} must be declared with option()")
            help_text, choices = field.metadata[_OPTION_METADATA]
            specs.append(OptionSpec(field.name, _value_type(hints[field.name]), field.default, help_text, choices))
        return tuple(specs)

    def validate(self) -> None:
        """Raise KvbenchError for option values that cannot work (alone or together). Only checks."""

    def options(self) -> dict[str, Any]:
        """Every option's value: what `run.json` records."""
        return {spec.name: getattr(self, spec.name) for spec in self.option_specs()}

    def non_default_options(self) -> dict[str, Any]:
        """Options set away from their defaults, capacity aside: they name the run folder with the budget."""
        return {spec.name: getattr(self, spec.name) for spec in self.option_specs()
                if spec.name != "capacity" and getattr(self, spec.name) != spec.default}

    @property
    def budget(self) -> int | None:
        """The token budget (``--capacity``), when the method has one and it is set."""
        return getattr(self, "capacity", None)

    def prepare(self, model: ModelInfo, shared: dict[Any, Any] | None = None) -> Compressor:
        """The method bound to ``model`` for one run (methods with resources or model checks override).

        ``shared``: one dict handed to every configuration of a grid, where a method keeps what its
        configurations can share (WindowKV's classifier, loaded once and asked once per sample)."""
        return Compressor(self, model)

    def select(self, layer: LayerPrefill) -> Selection | None:
        """Positions to keep in this layer, or None to keep the whole prompt (stateless methods)."""
        raise NotImplementedError(f"{type(self).__name__} keeps per-sample state: use prepare().start_sample()")


class Compressor:
    """A method bound to a model for one run: makes each sample's compression state."""

    def __init__(self, method: Method, model: ModelInfo):
        self.method = method
        self.model = model

    def identity(self) -> dict[str, Any]:
        """Content digests of the files this run reads besides model and data (classifier, profiles)."""
        return {}

    def start_sample(self, prompt_length: int, sample: dict | None = None) -> SampleCompression:
        """The compression state of one sample (``sample``: the task's fields plus ``prompt_text``)."""
        return SampleCompression(self.method)


class SampleCompression:
    """One sample's compression: what the hook calls during prefill, the decode loop while decoding."""

    #: whether the engine runs the scoring pre-pass (``observe`` on every layer) before the real prefill
    needs_scoring_pass: bool = False

    def __init__(self, method: Method):
        self.method = method

    def observe(self, layer: LayerPrefill) -> None:
        """Scoring pre-pass (only when ``needs_scoring_pass``): see one layer; nothing is stored."""

    def select(self, layer: LayerPrefill) -> Selection | None:
        return self.method.select(layer)

    def decode_eviction(self, layer_idx: int, cache_length: int, tokens_seen: int) -> int | None:
        """Cache index to drop before appending a decoded token, or None to just append."""
        return None

    def prompt_extended(self, tokens: int) -> None:
        """The question's ``tokens`` joined every layer's cache uncompressed after ``select`` (question-agnostic)."""

    def record(self) -> dict[str, Any]:
        """Extra fields for the sample's result row (e.g. the task type used)."""
        return {}
