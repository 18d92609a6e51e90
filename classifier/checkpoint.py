"""Task classifier checkpoints: one file, ``classifier.safetensors``, in a folder.

The file holds only what training changed (the encoder's last layer, its pooler
when used, the head: see `TaskClassifierModel.trained_parameter_names`); the rest
of the encoder is loaded from the encoder its metadata names. The metadata (the
format, the encoder, the pooling, the labels, the hidden size, what the
classifier reads of a prompt, and the training summary) is one JSON string in the
safetensors header's ``__metadata__``, under `METADATA_KEY`: tensors and metadata
are written together to a temporary file beside the target and swapped in with one
``os.replace``, so a reader sees the old checkpoint or the new one, never a mix,
whenever the writer is killed. Nothing is pickled. Any fault in a checkpoint is
one KvbenchError line.

`checkpoint_digest` is the sha256 of the file: results made with different
classifiers never share a digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors_from_bytes
from safetensors.torch import save_file

from kvbench.classifier.model import (LABELS, POOLINGS, PromptReader, TaskClassifier, TaskClassifierModel, is_plain_int,
                                      load_encoder, special_tokens)
from kvbench.errors import KvbenchError, error_line
from kvbench.paths import kvbench_home
from kvbench.runfolder import replace_atomically

CHECKPOINT_FILE = "classifier.safetensors"
#: format 1's separate metadata file (tensors and JSON renamed one after the other); no longer read
LEGACY_METADATA_FILE = "classifier.json"
FORMAT = "kvbench-task-classifier"
FORMAT_VERSION = 2
#: the key of the JSON metadata in the safetensors header's string-to-string ``__metadata__``
METADATA_KEY = "kvbench_task_classifier"
#: fields inference needs; "training" (the summary) is informative only
REQUIRED_FIELDS = ("format", "format_version", "encoder", "pooling", "labels", "hidden_size", "reader")


def default_checkpoint_path() -> Path:
    """Where `kvbench train-classifier` saves and `kvbench run --method windowkv` looks: $KVBENCH_HOME/classifier."""
    return kvbench_home() / "classifier"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: a checkpoint folder (its ``classifier.safetensors``) or the file itself."""
    path = Path(path)
    return path if path.is_file() else path / CHECKPOINT_FILE


def save_checkpoint(model: TaskClassifierModel, encoder: str, training: dict[str, Any] | None,
                    folder: str | os.PathLike) -> Path:
    """Write the trained tensors and the metadata into ``folder`` (created if needed) in one atomic swap; returns
    the folder. What the classifier reads is the model's `PromptReader` (``model.reader``, checked when the
    model was made), recorded in the metadata."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KvbenchError(f"cannot create checkpoint folder {folder} ({error.strerror})") from None
    parameters = dict(model.named_parameters())
    tensors = {name: parameters[name].detach().cpu().contiguous() for name in model.trained_parameter_names()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "pooling": model.pooling,
        "labels": list(LABELS),
        "hidden_size": model.encoder.config.hidden_size,
        "reader": model.reader.to_metadata(),
        "training": training if training is not None else {},
    }
    target = folder / CHECKPOINT_FILE
    try:
        replace_atomically(target, lambda partial: save_file(tensors, partial, metadata={METADATA_KEY: json.dumps(metadata)}))
    except OSError as error:
        raise KvbenchError(f"cannot write checkpoint {target} ({error.strerror or error})") from None
    # Format 1's metadata file, if an older kvbench trained here: stale now, and never read.
    (folder / LEGACY_METADATA_FILE).unlink(missing_ok=True)
    return folder


def refuse_legacy_format(folder: Path) -> None:
    """One line, if ``folder`` holds a format-1 classifier (its metadata file beside the tensors)."""
    if (folder / LEGACY_METADATA_FILE).is_file():
        raise KvbenchError(f"{folder}: a task classifier in an older format ({LEGACY_METADATA_FILE} beside the "
                           "tensors); retrain with `kvbench train-classifier`")


def read_checkpoint_bytes(path: str | os.PathLike) -> tuple[Path, bytes]:
    """(the checkpoint file, its content); a missing checkpoint says how to get one."""
    file = checkpoint_file(path)
    if not file.is_file():
        folder = file.parent
        refuse_legacy_format(folder)
        raise KvbenchError(f"no task classifier at {Path(path)}: run `kvbench train-classifier --data-dir DIR` (DIR: "
                           "LongBench <task>.jsonl files; without it LongBench comes from the hub) or pass "
                           "--task-type qa|other")
    try:
        return file, file.read_bytes()
    except OSError as error:
        raise KvbenchError(f"{file}: cannot read ({error.strerror or error})") from None


def checkpoint_digest(path: str | os.PathLike) -> str:
    """"sha256:<hex>" of the checkpoint file at ``path`` (a checkpoint folder or the file); the tensors and the
    metadata are both in it, so two checkpoints share a digest only if they are the same classifier."""
    _, content = read_checkpoint_bytes(path)
    return digest_of(content)


def digest_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def header_metadata(content: bytes, file: Path) -> dict[str, Any]:
    """The kvbench metadata in the safetensors header of ``content``, parsed but not yet checked."""
    if len(content) < 8:
        raise KvbenchError(f"{file}: not a readable safetensors file (only {len(content)} bytes)")
    header_size = int.from_bytes(content[:8], "little")
    if header_size > len(content) - 8:
        raise KvbenchError(f"{file}: not a readable safetensors file (header of {header_size} bytes in a file of {len(content)})")
    try:
        header = json.loads(content[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KvbenchError(f"{file}: not a readable safetensors file (header: {error})") from None
    embedded = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(embedded, dict) or METADATA_KEY not in embedded:
        refuse_legacy_format(file.parent)
        raise KvbenchError(f"{file}: a safetensors file without kvbench classifier metadata; "
                           "retrain with `kvbench train-classifier`")
    try:
        metadata = json.loads(embedded[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as error:
        raise KvbenchError(f"{file}: classifier metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise KvbenchError(f"{file}: classifier metadata must be a JSON object, got {type(metadata).__name__}")
    return metadata


def check_metadata(metadata: dict[str, Any], file: Path) -> PromptReader:
    """Fail in one line unless every field inference needs is there with the right type; returns the reader."""
    missing = [field for field in REQUIRED_FIELDS if field not in metadata]
    if missing:
        raise KvbenchError(f"{file}: lacks field(s) {', '.join(missing)}; retrain with `kvbench train-classifier`")
    if metadata["format"] != FORMAT or not is_plain_int(metadata["format_version"]) \
            or metadata["format_version"] != FORMAT_VERSION:
        raise KvbenchError(f"{file}: format {metadata['format']!r} version {metadata['format_version']!r}, "
                           f"expected {FORMAT!r} version {FORMAT_VERSION}; retrain with `kvbench train-classifier`")
    if not isinstance(metadata["encoder"], str) or not metadata["encoder"]:
        raise KvbenchError(f"{file}: encoder must be a non-empty string, got {describe(metadata['encoder'])}")
    if metadata["labels"] != list(LABELS):
        raise KvbenchError(f"{file}: labels {metadata['labels']!r}, expected {list(LABELS)!r}")
    if not isinstance(metadata["pooling"], str) or metadata["pooling"] not in POOLINGS:
        raise KvbenchError(f"{file}: pooling must be one of {', '.join(POOLINGS)}, got {describe(metadata['pooling'])}")
    if not is_plain_int(metadata["hidden_size"]) or metadata["hidden_size"] < 1:
        raise KvbenchError(f"{file}: hidden_size must be a positive integer, got {describe(metadata['hidden_size'])}")
    if "training" in metadata and not isinstance(metadata["training"], dict):
        raise KvbenchError(f"{file}: training must be an object, got {describe(metadata['training'])}")
    return PromptReader.from_metadata(metadata["reader"], str(file))


def describe(value: Any) -> str:
    """A value and its JSON type, so that "384" (a string) cannot read as 384."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return f"{json.dumps(value, ensure_ascii=False)} ({kinds.get(type(value), type(value).__name__)})"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, checked for every field inference needs."""
    file, content = read_checkpoint_bytes(path)
    metadata = header_metadata(content, file)
    check_metadata(metadata, file)
    return metadata


def load_classifier(path: str | os.PathLike | None = None, device: str = "cpu") -> TaskClassifier:
    """The classifier saved at ``path`` (a checkpoint folder or its file; None: `default_checkpoint_path()`), on
    ``device``. Its ``digest`` is `checkpoint_digest` of the very bytes loaded."""
    file, content = read_checkpoint_bytes(path if path is not None else default_checkpoint_path())
    metadata = header_metadata(content, file)
    reader = check_metadata(metadata, file)
    try:
        tensors = load_tensors_from_bytes(content)
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        reason = error_line(error)
        raise KvbenchError(f"{file}: not a readable safetensors file ({reason})") from None

    encoder = metadata["encoder"]
    tokenizer, encoder_model, _ = load_encoder(encoder)
    config = encoder_model.config
    if config.hidden_size != metadata["hidden_size"]:
        raise KvbenchError(f"{file}: trained on hidden size {metadata['hidden_size']}, but encoder {encoder!r} has {config.hidden_size}")
    tokens = reader.head_tokens + reader.tail_tokens + sum(map(len, special_tokens(tokenizer)))
    positions = getattr(config, "max_position_embeddings", tokens)
    if tokens > positions:
        raise KvbenchError(f"{file}: reads {tokens} tokens, more than encoder {encoder!r}'s {positions} positions")
    model = TaskClassifierModel(encoder_model, metadata["pooling"], reader)
    check_tensors(model, tensors, file, encoder)
    model.load_state_dict(tensors, strict=False)
    return TaskClassifier(model, tokenizer, encoder, device, digest=digest_of(content))


def check_tensors(model: TaskClassifierModel, tensors: dict[str, torch.Tensor], tensors_path: Path, encoder: str) -> None:
    """Fail unless ``tensors`` are exactly the model's trained parameters, shape for shape."""
    parameters = dict(model.named_parameters())
    expected = model.trained_parameter_names()
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise KvbenchError(f"{tensors_path}: lacks {len(missing)} tensor(s) for encoder {encoder!r}, e.g. {missing[0]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise KvbenchError(f"{tensors_path}: has {len(unexpected)} tensor(s) encoder {encoder!r} does not train, e.g. {unexpected[0]}")
    for name in expected:
        if tensors[name].shape != parameters[name].shape:
            raise KvbenchError(f"{tensors_path}: tensor {name} has shape {list(tensors[name].shape)}, "
                               f"encoder {encoder!r} expects {list(parameters[name].shape)}")
        if tensors[name].dtype != parameters[name].dtype:
            raise KvbenchError(f"{tensors_path}: tensor {name} is {str(tensors[name].dtype).replace('torch.', '')}, "
                               f"encoder {encoder!r} expects {str(parameters[name].dtype).replace('torch.', '')}")
