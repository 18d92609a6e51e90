"""Task classifier checkpoints: a folder with ``classifier.safetensors`` and ``classifier.json``.

The safetensors file holds only what training changed (the encoder's last layer,
its pooler when used, the head: see `TaskClassifierModel.trained_parameter_names`);
the rest of the encoder is loaded from the encoder named in the JSON. The JSON
also records the pooling, the labels, the token limit and the training summary.
Nothing is pickled. Any fault in a checkpoint is one KvbenchError line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvbench.classifier.model import LABELS, POOLINGS, TaskClassifier, TaskClassifierModel, load_encoder
from kvbench.errors import KvbenchError
from kvbench.paths import kvbench_home

TENSORS_FILE = "classifier.safetensors"
METADATA_FILE = "classifier.json"
FORMAT = "kvbench-task-classifier"
FORMAT_VERSION = 1
#: fields inference needs; "training" (the summary) is informative only
REQUIRED_FIELDS = ("format", "format_version", "encoder", "pooling", "labels", "max_length", "hidden_size")


def default_checkpoint_path() -> Path:
    """Where `kvbench train-classifier` saves and `kvbench run --method windowkv` looks: $KVBENCH_HOME/classifier."""
    return kvbench_home() / "classifier"


def save_checkpoint(model: TaskClassifierModel, encoder: str, max_length: int, training: dict[str, Any],
                    folder: str | os.PathLike) -> Path:
    """Write the trained tensors and the metadata into ``folder`` (created if needed); returns the folder."""
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
        "max_length": max_length,
        "hidden_size": model.encoder.config.hidden_size,
        "training": training,
    }
    # Write beside the target, then rename, so that a reader never sees half a checkpoint.
    save_file(tensors, folder / f".{TENSORS_FILE}.partial")
    (folder / f".{METADATA_FILE}.partial").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(folder / f".{TENSORS_FILE}.partial", folder / TENSORS_FILE)
    os.replace(folder / f".{METADATA_FILE}.partial", folder / METADATA_FILE)
    return folder


def read_metadata(folder: Path) -> dict[str, Any]:
    """The checkpoint's JSON, checked for every field inference needs."""
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise KvbenchError(f"no task classifier at {folder}: run `kvbench train-classifier` or pass --task-type qa|other")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KvbenchError(f"{metadata_path}: not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise KvbenchError(f"{metadata_path}: expected a JSON object")
    missing = [field for field in REQUIRED_FIELDS if field not in metadata]
    if missing:
        raise KvbenchError(f"{metadata_path}: lacks field(s) {', '.join(missing)}; retrain with `kvbench train-classifier`")
    if metadata["format"] != FORMAT or metadata["format_version"] != FORMAT_VERSION:
        raise KvbenchError(f"{metadata_path}: format {metadata['format']!r} version {metadata['format_version']!r}, "
                           f"expected {FORMAT!r} version {FORMAT_VERSION}")
    if metadata["labels"] != list(LABELS):
        raise KvbenchError(f"{metadata_path}: labels {metadata['labels']!r}, expected {list(LABELS)!r}")
    if metadata["pooling"] not in POOLINGS:
        raise KvbenchError(f"{metadata_path}: pooling {metadata['pooling']!r}, expected one of {', '.join(POOLINGS)}")
    if not isinstance(metadata["max_length"], int) or metadata["max_length"] < 2:
        raise KvbenchError(f"{metadata_path}: max_length must be an integer >= 2, got {metadata['max_length']!r}")
    if not isinstance(metadata["encoder"], str) or not metadata["encoder"]:
        raise KvbenchError(f"{metadata_path}: encoder must be a non-empty string, got {metadata['encoder']!r}")
    return metadata


def load_classifier(path: str | os.PathLike | None = None, device: str = "cpu") -> TaskClassifier:
    """The classifier saved in folder ``path`` (None: `default_checkpoint_path()`), on ``device``."""
    folder = Path(path) if path is not None else default_checkpoint_path()
    metadata = read_metadata(folder)
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise KvbenchError(f"{tensors_path}: no such file (the checkpoint is incomplete; retrain with `kvbench train-classifier`)")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as error:
        raise KvbenchError(f"{tensors_path}: not a readable safetensors file ({error})") from None

    encoder = metadata["encoder"]
    tokenizer, encoder_model, _ = load_encoder(encoder)
    config = encoder_model.config
    if config.hidden_size != metadata["hidden_size"]:
        raise KvbenchError(f"{folder}: trained on hidden size {metadata['hidden_size']}, but encoder {encoder!r} has {config.hidden_size}")
    if metadata["max_length"] > getattr(config, "max_position_embeddings", metadata["max_length"]):
        raise KvbenchError(f"{folder}: max_length {metadata['max_length']} exceeds encoder {encoder!r}'s {config.max_position_embeddings} positions")
    model = TaskClassifierModel(encoder_model, metadata["pooling"])
    check_tensors(model, tensors, tensors_path, encoder)
    model.load_state_dict(tensors, strict=False)
    return TaskClassifier(model, tokenizer, encoder, metadata["max_length"], device)


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
