"""PrefixKV (Wang et al., 2024): per-layer budgets from one global retention level.

Per layer, the middle prompt tokens (all but the first ``start_size`` and the
last ``protect_size``) are ranked by importance (`kvbench.methods.importance`:
attention received from every prompt query, averaged over query heads). Their
scores, sorted in descending order and normalised to sum 1, give a cumulative
curve; for a retention level ``p`` a layer keeps the shortest prefix of its
ranking whose mass reaches ``p``. One ``p`` for all layers yields different
budgets per layer (a layer whose attention is concentrated needs few tokens);
``p`` is binary-searched so that the total dropped over all layers equals the
budget, and each layer then drops its lowest-ranked middle tokens. While
decoding, the cache is held at its size by fixed-point elimination
(`kvbench.methods.fixed_point`).

Where the budgets come from (``--prefix-config``):
  default: the offline profile, as in the paper: ``kvbench profile`` runs the
      search on calibration prompts, averages each layer's drop ratio over
      them and writes ``<KVBENCH_HOME>/prefixkv/prefixkv_<model>_<ratio>.json``;
      a run uses the file for its model and ratio (with ``--capacity``, the
      file of that model whose ratio is nearest the sample's ``1 - C / L``);
  PATH: that config file;
  ``online``: the search runs on every sample's own scores. This needs all
      layers' scores before the first layer is compressed, so the method asks
      the engine for a scoring pre-pass (``needs_scoring_pass``/``observe``, see
      `kvbench.methods.base`): one more prefill, no cache stored.
Config ratios are rescaled to the sample's budget and rounded by largest
remainder, so totals are exact under both ``--ratio`` and ``--capacity``.

Differences from the reference (THU-MIG/PrefixKV, ``obtain_cdf_num``) and why:
  * The cumulative curve covers the middle tokens only; the reference sorts all
    tokens, so the attention sinks, always kept anyway, hold most of the mass
    and distort every layer's curve.
  * The search keeps both ends and stops when the dropped total equals the
    budget exactly (or the interval cannot be halved, then tied thresholds are
    assigned by largest threshold first, lower layer first); the reference
    stops anywhere within 5 tokens, rescales and truncates, so its totals fall
    short of the budget by up to a token per layer.
  * The level ``p`` maps to "keep the tokens whose preceding mass is < p"; a
    level of 0 keeps no middle token, so budgets down to ``start_size +
    protect_size`` are reachable (the reference always keeps one).
  * Equal scores rank the earlier token first (stable sort); the reference's
    ``argsort`` leaves ties to the backend.
  * Decoding: see `kvbench.methods.fixed_point` (exact integer rule, ``--capacity``
    holds the size constant).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.errors import KvbenchError
from kvbench.methods import register
from kvbench.methods.base import Compressor, LayerPrefill, ModelInfo, Selection, keep_positions, option
from kvbench.methods.fixed_point import FixedPointMethod, FixedPointSample, round_half_up
from kvbench.methods.importance import (attention_importance, middle_range, protected_positions, rank_middle,
                                       ranked_by_importance)
from kvbench.paths import kvbench_home
from kvbench.runfolder import read_json_and_digest, write_json

CONFIG_FORMAT = "kvbench-prefixkv-1"
ONLINE = "online"


# -- the search ------------------------------------------------------------------------------


def exclusive_mass(middle_scores: torch.Tensor) -> torch.Tensor:
    """(layers, M) scores -> (layers, M) float64: per layer, the normalised mass ranked before each rank.

    Row l, column j: the share of layer l's middle mass held by its j most
    important tokens (0 for j = 0). A level p keeps the ranks whose value is < p.
    A row without mass (all zero) is treated as uniform.
    """
    ranked = middle_scores.detach().to("cpu", torch.float64).sort(dim=-1, descending=True, stable=True).values
    ranked = ranked.clamp_min(0)
    totals = ranked.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(ranked, 1.0)
    ranked = torch.where(totals > 0, ranked, uniform)
    ranked = ranked / ranked.sum(dim=-1, keepdim=True)
    return ranked.cumsum(dim=-1) - ranked


def _kept_at(mass: torch.Tensor, level: float) -> torch.Tensor:
    """Tokens each layer keeps at retention level ``level``: count of ranks with preceding mass < level."""
    query = torch.full((mass.shape[0], 1), level, dtype=mass.dtype)
    return torch.searchsorted(mass, query, right=False).view(-1)


def search_layer_drops(middle_scores: torch.Tensor, total_drop: int, max_iterations: int = 200) -> tuple[list[int], float]:
    """Binary search of the retention level: per-layer drop counts summing exactly to ``total_drop``.

    middle_scores: (layers, M) importance of each layer's middle tokens.
    Returns (drops per layer, the level p found).
    """
    layers, middle = middle_scores.shape
    if not 0 <= total_drop <= layers * middle:
        raise ValueError(f"total_drop {total_drop} outside [0, {layers * middle}]")
    if total_drop == 0:
        return [0] * layers, 1.0
    if total_drop == layers * middle:
        return [middle] * layers, 0.0
    mass = exclusive_mass(middle_scores)

    def dropped(level: float) -> int:
        return layers * middle - int(_kept_at(mass, level).sum())

    # Invariant: dropped(low) > total_drop > dropped(high). dropped(0) = all; every value is < 1 < 2.
    low, high = 0.0, 2.0
    for _ in range(max_iterations):
        mid = (low + high) / 2
        if mid <= low or mid >= high:
            break
        count = dropped(mid)
        if count == total_drop:
            return [middle - int(k) for k in _kept_at(mass, mid)], mid
        if count > total_drop:
            low = mid
        else:
            high = mid
    # The interval cannot be split further: the tokens kept at `high` but not at `low` share
    # (nearly) one threshold. Drop the missing ones by largest threshold first, lower layer first.
    kept_high = _kept_at(mass, high)
    kept_low = _kept_at(mass, low)
    extra = total_drop - (layers * middle - int(kept_high.sum()))
    candidates = []
    for layer in range(layers):
        for rank in range(int(kept_low[layer]), int(kept_high[layer])):
            candidates.append((-float(mass[layer, rank]), layer))
    candidates.sort()
    drops = [middle - int(k) for k in kept_high]
    for _, layer in candidates[:extra]:
        drops[layer] += 1
    return drops, high


def allocate_drops(layer_ratios: list[float], total_drop: int, cap: int) -> list[int]:
    """Integer drops proportional to ``layer_ratios``, each at most ``cap``, summing to ``total_drop``.

    Layers whose share exceeds ``cap`` are clipped and the rest redistributed; the
    fractional parts go by largest remainder (ties: lower layer).
    """
    layers = len(layer_ratios)
    if not 0 <= total_drop <= layers * cap:
        raise ValueError(f"total_drop {total_drop} outside [0, {layers * cap}]")
    drops = [0] * layers
    free = list(range(layers))
    remaining = total_drop
    shares: dict[int, float] = {}
    while free and remaining > 0:
        weights = {i: max(0.0, float(layer_ratios[i])) for i in free}
        if sum(weights.values()) <= 0:
            weights = {i: 1.0 for i in free}
        weight_sum = sum(weights.values())
        shares = {i: remaining * weights[i] / weight_sum for i in free}
        clipped = [i for i in free if shares[i] >= cap]
        if not clipped:
            break
        for i in clipped:
            drops[i] = cap
            remaining -= cap
        free = [i for i in free if i not in clipped]
        shares = {}
    if shares and remaining > 0:
        floors = {i: math.floor(shares[i]) for i in free}
        for i in free:
            drops[i] = floors[i]
        left = remaining - sum(floors.values())
        by_remainder = sorted(free, key=lambda i: (-(shares[i] - floors[i]), i))
        for i in by_remainder[:left]:
            drops[i] += 1
    return drops


# -- configs -----------------------------------------------------------------------------------


def config_dir() -> Path:
    return kvbench_home() / "prefixkv"


def _ratio_text(ratio: float) -> str:
    return repr(float(ratio))


def _safe_name(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_name)


def config_path(model_name: str, ratio: float, directory: Path | None = None) -> Path:
    """Default location of the profile of ``model_name`` (a short model name) at ``ratio``."""
    return (directory or config_dir()) / f"prefixkv_{_safe_name(model_name)}_{_ratio_text(ratio)}.json"


def model_configs(model_name: str, directory: Path | None = None) -> list[dict[str, Any]]:
    """Every profile of ``model_name`` at the default location, any ratio, sorted by ratio."""
    paths = sorted((directory or config_dir()).glob(f"prefixkv_{_safe_name(model_name)}_*.json"))
    configs = [read_config(path) for path in paths]  # the glob also matches longer model names: filter
    return sorted((c for c in configs if c["model"] == model_name), key=lambda c: c["ratio"])


def profile_command(ratio: float | str) -> str:
    """The command that writes a missing profile (``--model``: the run's own, which may be a path or hub id)."""
    return f"kvbench profile --method prefixkv --model <this run's --model> --ratio {ratio}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_config(path: str | Path) -> dict[str, Any]:
    """Load and check a profile written by `kvbench profile`; KvbenchError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise KvbenchError(f"cannot read PrefixKV config {path}: no such file")
    config, digest = read_json_and_digest(path)
    missing = [key for key in ("model", "num_layers", "ratio", "layer_ratios") if key not in config]
    if missing:
        raise KvbenchError(f"PrefixKV config {path} lacks {', '.join(missing)}; rewrite it with `kvbench profile`")
    ratios = config["layer_ratios"]
    if (
        not isinstance(config["num_layers"], int)
        or isinstance(config["num_layers"], bool)
        or not isinstance(ratios, list)
        or len(ratios) != config["num_layers"]
        or not all(_is_number(r) and 0 <= r <= 1 for r in ratios)
    ):
        raise KvbenchError(
            f"PrefixKV config {path}: layer_ratios must be num_layers ({config['num_layers']}) numbers in [0, 1]"
        )
    if not _is_number(config["ratio"]) or not 0 <= config["ratio"] < 1:
        raise KvbenchError(f"PrefixKV config {path}: ratio must be in [0, 1), got {config['ratio']!r}")
    config["path"] = str(path)
    config["sha256"] = digest
    return config


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write a profile atomically (a kill never leaves half a file where `run` looks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {key: value for key, value in config.items() if key not in ("path", "sha256")})
    return path


def check_config_model(config: dict[str, Any], model_name: str, num_layers: int) -> None:
    if config["num_layers"] != num_layers:
        raise KvbenchError(
            f"PrefixKV config {config['path']} was profiled on {config['model']} with {config['num_layers']} layers; "
            f"this model has {num_layers}: run `{profile_command(config['ratio'])}`"
        )
    if config["model"] != model_name:
        raise KvbenchError(
            f"PrefixKV config {config['path']} is for model {config['model']}, not {model_name}: "
            f"run `{profile_command(config['ratio'])}`"
        )


def layer_drop_ratios(
    layer_scores: torch.Tensor, ratio: float, start_size: int = 4, protect_size: int = 1
) -> list[float]:
    """One sample's searched drop per layer as a fraction of its prompt length (the profile's unit)."""
    layers, length = layer_scores.shape
    lo, hi = middle_range(length, start_size, protect_size)
    middle = hi - lo
    total = min(round_half_up(ratio * length * layers), middle * layers)
    if middle == 0:
        return [0.0] * layers
    drops, _ = search_layer_drops(layer_scores[:, lo:hi], total)
    return [drop / length for drop in drops]


# -- the method -------------------------------------------------------------------------------


@register
@dataclass(frozen=True, kw_only=True)
class PrefixKV(FixedPointMethod):
    name = "prefixkv"
    description = (
        "Per-layer budgets from one global retention level over cumulative attention (binary search; "
        "offline profile or online), fixed-point eviction while decoding."
    )

    prefix_config: str | None = option(
        None,
        "per-layer budget profile: a JSON file from `kvbench profile`, 'online' (search per sample), "
        "or unset for the profile of this model and ratio under KVBENCH_HOME/prefixkv",
    )

    def prepare(self, model: ModelInfo, shared: dict[Any, Any] | None = None) -> PrefixKVCompressor:
        return PrefixKVCompressor(self, model)


class PrefixKVCompressor(Compressor):
    """PrefixKV bound to a model: the profiles it may use, found and checked before any sample."""

    method: PrefixKV

    def __init__(self, method: PrefixKV, model: ModelInfo):
        super().__init__(method, model)
        #: candidate profiles: one for --ratio or a given file; every ratio of the model for --capacity
        self.configs: list[dict[str, Any]] = []
        if method.prefix_config == ONLINE:
            return
        if method.prefix_config is not None:
            self.configs = [read_config(method.prefix_config)]
        else:
            self.configs = self._default_configs(model.name)
        for config in self.configs:
            check_config_model(config, model.name, model.num_layers)

    def _default_configs(self, model_name: str) -> list[dict[str, Any]]:
        ratio = self.method.ratio
        if ratio is not None:
            path = config_path(model_name, ratio)
            if not path.is_file():
                raise KvbenchError(
                    f"no PrefixKV profile for {model_name} at ratio {ratio} ({path}): run "
                    f"`{profile_command(ratio)}`, or pass --prefix-config online"
                )
            return [read_config(path)]
        configs = model_configs(model_name)
        if not configs:
            raise KvbenchError(
                f"no PrefixKV profile for {model_name} in {config_dir()}: run "
                f"`{profile_command('R')}` for a ratio R near 1 - capacity / prompt length, "
                "or pass --prefix-config online"
            )
        return configs

    def identity(self) -> dict[str, Any]:
        """The profiles' content digests: results made with another profile never share a run folder."""
        return {"prefixkv_profiles": {Path(config["path"]).name: config["sha256"] for config in self.configs}}

    def start_sample(self, prompt_length: int, sample: dict | None = None) -> PrefixKVSample:
        return PrefixKVSample(self, prompt_length)


class PrefixKVSample(FixedPointSample):
    """One sample: its per-layer drops (from a profile, or searched after the scoring pre-pass)."""

    method: PrefixKV

    def __init__(self, compressor: PrefixKVCompressor, prompt_length: int):
        method = compressor.method
        num_layers = compressor.model.num_layers
        super().__init__(method, prompt_length, num_layers)
        self.scores: dict[int, torch.Tensor] = {}
        self.drops: list[int] | None = None
        self.info: dict[str, Any] = {}
        total = method.total_drop(prompt_length, num_layers)
        if total == 0:
            self.drops = [0] * num_layers
        elif method.prefix_config != ONLINE:
            config = self._config_for(compressor.configs, prompt_length)
            self.drops = allocate_drops(config["layer_ratios"], total, method.middle_size(prompt_length))
            self.info = {"prefix_config": config["path"], "prefix_config_ratio": config["ratio"]}
        # online: the drops are searched once the pre-pass has observed every layer; an uncompressed
        # sample needs no pre-pass
        self.needs_scoring_pass = self.drops is None
        self._set_kept()

    def _config_for(self, configs: list[dict[str, Any]], prompt_length: int) -> dict[str, Any]:
        """The profile for this sample: the only one, or (with --capacity) the nearest ratio."""
        if len(configs) == 1:
            return configs[0]
        target = 1 - self.method.capacity / prompt_length
        return min(configs, key=lambda config: (abs(config["ratio"] - target), config["ratio"]))

    def _set_kept(self) -> None:
        self.kept = None if self.drops is None else [self.prompt_length - drop for drop in self.drops]

    def observe(self, layer: LayerPrefill) -> None:
        """Scoring pre-pass (``--prefix-config online``): remember the layer's scores."""
        if self.drops is not None:
            return  # nothing to search (uncompressed sample)
        self.scores[layer.layer_idx] = attention_importance(layer)
        if len(self.scores) == layer.num_layers:
            self._search()

    def _search(self) -> None:
        method = self.method
        length = self.prompt_length
        lo, hi = middle_range(length, method.start_size, method.protect_size)
        middle = torch.stack([self.scores[i][lo:hi] for i in range(self.num_layers)])
        self.drops, level = search_layer_drops(middle, method.total_drop(length, self.num_layers))
        self.info = {"prefix_config": ONLINE, "prefix_level": level}
        self._set_kept()

    def select(self, layer: LayerPrefill) -> Selection | None:
        if self.drops is None:
            raise KvbenchError(
                "PrefixKV with --prefix-config online needs the engine's scoring pre-pass "
                "(observe() on every layer before select())"
            )
        drop = self.drops[layer.layer_idx]
        if drop == 0:
            return None
        method = self.method
        scores = self.scores.pop(layer.layer_idx, None)  # the pre-pass's, when online
        ranked = (ranked_by_importance(layer, method.start_size, method.protect_size) if scores is None
                  else rank_middle(scores, method.start_size, method.protect_size))
        keep = ranked[: ranked.shape[0] - drop]
        protected = protected_positions(layer.prompt_length, method.start_size, method.protect_size, keep.device)
        return keep_positions(torch.cat([protected, keep]), layer.keys.shape[1])

    def record(self) -> dict[str, Any]:
        return {**super().record(), **self.info}
