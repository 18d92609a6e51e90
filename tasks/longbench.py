"""LongBench v1 and LongBench-E data and prompts, and the Task the run loop drives.

The task table (templates, generation lengths, metrics) is `kvbench.tasks.longbench_spec`;
the scorer is `kvbench.tasks.evaluate`. Data come from ``--data-dir`` or the hub's data.zip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError, error_line, unknown_name_message
from kvbench.paths import kvbench_home
from kvbench.runfolder import file_digest, check_id
from kvbench.tasks.base import Task
from kvbench.tasks.evaluate import score_rows, score_rows_and_samples
from kvbench.tasks.jsonl import read_jsonl
from kvbench.tasks.longbench_spec import LONGBENCH_E_TASKS, TASK_TABLE, TaskInfo, first_line, resolve_longbench_name

LONGBENCH_HUB_REPO = "THUDM/LongBench"
LONGBENCH_HUB_ARCHIVE = "data.zip"

#: fields a LongBench sample must have: the prompt's, the scorer's, and a unique id
SAMPLE_FIELDS = ("_id", "context", "input", "answers", "length")


# --- data ------------------------------------------------------------------------------------


def task_data_path(task_name: str, data_dir: str | os.PathLike | None = None, longbench_e: bool = False) -> Path:
    """The file a task's samples come from: ``data_dir/<task>[_e].jsonl``, or the hub's copy."""
    if task_name not in TASK_TABLE:
        raise KvbenchError(unknown_name_message("LongBench task", task_name, list(TASK_TABLE)))
    if longbench_e and task_name not in LONGBENCH_E_TASKS:
        raise KvbenchError(f"{task_name} has no LongBench-E variant; LongBench-E tasks: {', '.join(LONGBENCH_E_TASKS)}")
    file_name = f"{task_name}_e.jsonl" if longbench_e else f"{task_name}.jsonl"
    folder = Path(data_dir) if data_dir is not None else hub_data_folder()
    path = folder / file_name
    if path.is_dir():
        raise KvbenchError(f"{path}: is a folder, expected a <task>.jsonl file")
    if not path.is_file():
        raise KvbenchError(f"{path}: no such file (the data folder must hold <task>.jsonl files as in LongBench's data.zip)")
    return path


def load_task_samples(task_name: str, data_dir: str | os.PathLike | None = None, longbench_e: bool = False) -> list[dict[str, Any]]:
    """The samples of one LongBench task, from ``data_dir/<task>[_e].jsonl`` or else the Hugging Face hub."""
    path = task_data_path(task_name, data_dir, longbench_e)
    samples = []
    seen_ids = set()
    for line_number, sample in read_jsonl(path):
        missing = [field for field in SAMPLE_FIELDS if field not in sample]
        if missing:
            raise KvbenchError(f"{path}:{line_number}: sample lacks {', '.join(missing)}")
        check_id(sample["_id"], f"{path}:{line_number}")
        if sample["_id"] in seen_ids:
            raise KvbenchError(f"{path}:{line_number}: _id {sample['_id']!r} appears twice")
        seen_ids.add(sample["_id"])
        samples.append(sample)
    if not samples:
        raise KvbenchError(f"{path}: no samples")
    return samples


def hub_data_folder() -> Path:
    """The ``data/`` folder of LongBench's data.zip: downloaded to the hub cache, extracted once beside it.

    The cache is tried first and offline is told at once: without a network the hub client
    would otherwise spend half a minute on retries before saying so.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline_message = (
        f"LongBench is not in the Hugging Face cache and the hub cannot be reached; pass --data-dir DIR where DIR "
        f"holds <task>.jsonl files (the data/ folder of {LONGBENCH_HUB_REPO}'s {LONGBENCH_HUB_ARCHIVE})"
    )
    try:
        archive = Path(hf_hub_download(LONGBENCH_HUB_REPO, LONGBENCH_HUB_ARCHIVE, repo_type="dataset",
                                       local_files_only=True))
    except LocalEntryNotFoundError:
        if not hub_reachable():
            raise KvbenchError(offline_message) from None
        archive = None
    if archive is None:
        try:
            archive = Path(hf_hub_download(LONGBENCH_HUB_REPO, LONGBENCH_HUB_ARCHIVE, repo_type="dataset"))
        except LocalEntryNotFoundError:
            raise KvbenchError(offline_message) from None
        except HfHubHTTPError as error:
            reason = error_line(error)
            raise KvbenchError(f"cannot download {LONGBENCH_HUB_REPO}/{LONGBENCH_HUB_ARCHIVE} ({reason}); "
                               "pass --data-dir DIR with <task>.jsonl files") from None
    # The hub caches the archive under snapshots/<revision>/, so the revision names the extraction.
    extracted = kvbench_home() / "longbench" / archive.parent.name
    _extract_once(archive, extracted)
    return extracted / "data"


def hub_reachable(timeout_seconds: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once under HF_HUB_OFFLINE=1 or without a network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_seconds).close()
    except OSError:
        return False
    return True


def _extract_once(archive: Path, target: Path) -> None:
    """Unzip ``archive`` into ``target`` unless done before; a half-finished extraction is never visible."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same extraction first; theirs is as good as ours.
            if not target.is_dir():
                raise
    except zipfile.BadZipFile:
        raise KvbenchError(f"{archive}: not a readable zip archive; delete it so that it is downloaded again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- prompts ---------------------------------------------------------------------------------


def fill_template(info: TaskInfo, sample: dict[str, Any]) -> str:
    """The task's official prompt with the sample's fields filled in."""
    try:
        return info.prompt_template.format(**sample)
    except KeyError as error:
        raise KvbenchError(f"{info.name} sample {sample.get('_id', '?')!r} has no field {error.args[0]!r}") from None


def fill_question(info: TaskInfo, sample: dict[str, Any]) -> str:
    """The question part of the filled prompt (`TaskInfo.question_template`): a suffix of `fill_template`."""
    return info.question_template.format(input=sample["input"])


def truncate_middle(tokenizer, text: str, max_length: int) -> str:
    """``text`` cut to its first and last ``max_length // 2`` tokens, as official pred.py does.

    The tokens are counted as pred.py counts them (with the tokenizer's special tokens)
    and the halves are decoded without special tokens and joined with nothing between.
    """
    if max_length < 2:
        raise KvbenchError(f"max_length must be at least 2 tokens, got {max_length}")
    token_ids = tokenizer(text, truncation=False)["input_ids"]
    if len(token_ids) <= max_length:
        return text
    half = max_length // 2
    head = tokenizer.decode(token_ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(token_ids[-half:], skip_special_tokens=True)
    return head + tail


def build_prompt_ids(info: TaskInfo, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
    """Token ids of the prompt the model reads: filled, middle-truncated, in the chat template where official code uses one."""
    prompt = truncate_middle(tokenizer, fill_template(info, sample), max_length)
    if info.raw_prompt or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(prompt)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# --- the task --------------------------------------------------------------------------------


class LongBenchTask(Task):
    """One LongBench dataset ("qasper") or its LongBench-E variant ("qasper_e")."""

    truncates_prompts = True

    def __init__(self, name: str):
        self.info, self.longbench_e = resolve_longbench_name(name)
        self.name = name
        self.category = self.info.category
        self.max_new_tokens = self.info.max_new_tokens

    def load_samples(self, data_dir: str | None) -> list[dict[str, Any]]:
        return load_task_samples(self.info.name, data_dir, longbench_e=self.longbench_e)

    def identity(self, data_dir: str | None) -> dict[str, Any]:
        """The content digest of the task's data file: the same samples under another path are the same data."""
        return {"sha256": file_digest(task_data_path(self.info.name, data_dir, self.longbench_e))}

    def prompt_text(self, sample: dict[str, Any]) -> str:
        return fill_template(self.info, sample)

    def prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
        return build_prompt_ids(self.info, sample, tokenizer, max_length)

    def question_part(self, sample: dict[str, Any]) -> str:
        return fill_question(self.info, sample)

    def stop_token_ids(self, tokenizer) -> set[int]:
        # Official pred.py ends samsum generation at the first newline token as well as at EOS.
        if self.info.name == "samsum":
            return {tokenizer.encode("\n", add_special_tokens=False)[-1]}
        return set()

    def postprocess(self, prediction: str) -> str:
        return first_line(prediction) if self.info.first_line_only else prediction

    def row_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {
            "answers": sample["answers"],
            "all_classes": sample.get("all_classes"),
            "length": sample["length"],
            "language": self.info.language,
        }

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return score_rows(self.name, rows, longbench_e=self.longbench_e)

    def score_with_samples(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, float]]]:
        return score_rows_and_samples(self.name, rows, longbench_e=self.longbench_e)
