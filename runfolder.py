"""The run folder: the one place that knows its layout, how rows are written and read, and its lock.

A run folder is ``OUTPUT/<model>/<label>/`` holding

* ``run.json``: what the run is (model, method, every setting that can change a row,
  the data each task read) and the samples planned per task; written once the run's
  settings are validated, and checked whenever the folder is reused;
* ``<task>.jsonl``: one JSON row per finished sample, appended, flushed and fsynced
  as the sample finishes;
* ``scores.json``: per-task scores, rewritten atomically at the end of each run;
* ``.lock``: held (``flock``) by the process running on the folder; the kernel drops
  it when that process dies, so a kill never leaves the folder locked.

A line without its final newline was cut short by a kill (or is being written right
now): the run loop cuts it off and redoes the sample; readers skip it. Both go
through `parse_result_file`, so they agree on what a finished row is.

Standard library only: `kvbench report` and `kvbench eval` read run folders without torch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError

RUN_FILE = "run.json"
SCORES_FILE = "scores.json"
LOCK_FILE = ".lock"
RESULT_SUFFIX = ".jsonl"
#: file-system limit on one path component (ext4, APFS, NTFS)
MAX_NAME_BYTES = 255
#: a label part longer than this is shortened to its start and a digest of the whole
MAX_PART_CHARS = 48


def result_path(run_dir: Path, task: str) -> Path:
    return Path(run_dir) / f"{task}{RESULT_SUFFIX}"


# -- names ---------------------------------------------------------------------------------------


def _safe_part(text: str) -> str:
    """A folder-name part: no path separators or control characters; long values shortened with a digest."""
    safe = re.sub(r"[\x00-\x1f/\\]", "_", str(text))
    if len(safe) > MAX_PART_CHARS:
        digest = hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[:MAX_PART_CHARS - 11]}~{digest}"
    return safe


def folder_name(text: str) -> str:
    """``text`` as one folder name that cannot leave its parent ("..", "/x" and "" are made safe)."""
    name = _safe_part(text)
    if name in ("", ".", ".."):
        name = name.replace(".", "_") or "_"
    return name[:MAX_NAME_BYTES]


def run_label(parts: list[str], options: dict[str, Any]) -> str:
    """A run's folder name: its parts (method, budget) and ``option=value`` for each option set away from
    its default, each part kept short, the whole within the file system's name limit."""
    pieces = [_safe_part(part) for part in parts] + [f"{name}={_safe_part(option_text(value))}" for name, value in options.items()]
    label = "-".join(pieces)
    if len(label.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12]
        label = label.encode("utf-8")[: MAX_NAME_BYTES - 13].decode("utf-8", "ignore") + "~" + digest
    return folder_name(label)


def option_text(value: Any) -> str:
    """An option's value as a folder name and the report show it: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def run_dir_for(output_dir: Path, model_name: str, label: str) -> Path:
    return Path(output_dir) / folder_name(model_name) / label


# -- JSON files ------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; any fault (unreadable, not UTF-8, not JSON, not an object) is one line."""
    return _json_object(_read_bytes(path), path)


def read_json_and_digest(path: Path) -> tuple[dict[str, Any], str]:
    """`read_json`, and the sha256 of the very bytes parsed (a file replaced in between cannot pair one
    version's content with another's digest)."""
    content = _read_bytes(path)
    return _json_object(content, path), hashlib.sha256(content).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise KvbenchError(f"{path}: cannot read ({error.strerror or error})") from None


def _json_object(content: bytes, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise KvbenchError(f"{path}: not UTF-8 text (byte {error.start + 1})") from None
    except (json.JSONDecodeError, RecursionError) as error:
        reason = f"{error.msg}, line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise KvbenchError(f"{path}: not valid JSON ({reason}); delete or repair it") from None
    if not isinstance(data, dict):
        raise KvbenchError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file and an atomic rename, so a kill never leaves half a JSON file."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        replace_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise KvbenchError(f"{path}: cannot write ({error.strerror or error})") from None


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Make ``path`` what ``write`` writes into a temporary file beside it: fsynced, then swapped in by one
    ``os.replace``, so a reader (or a rerun after a kill) sees the old file or the new one, never half of one
    or a mix. The temporary file is removed on any failure; OSError is left to the caller to word."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -- result rows -------------------------------------------------------------------------------------


def valid_id(value: Any) -> bool:
    """A sample id is a string or a whole number (LongBench's are hex strings, the needle's names)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_id(value: Any, where: str) -> None:
    """Refuse an id that is not `valid_id` in one line naming ``where`` (file:line)."""
    if not valid_id(value):
        raise KvbenchError(f"{where}: _id must be a string or a whole number, found {type(value).__name__}")


def parse_result_file(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Finished rows of a ``<task>.jsonl`` ([] when absent), and the byte length of a last line left
    without its newline by a writer that was killed or is still writing (0 when there is none).

    The cut line is judged by its missing newline alone, whatever its bytes (a kill can cut a
    multi-byte character in two). Any complete line that is not a JSON object with a string or
    integer ``_id`` is one error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    if not path.is_file():
        raise KvbenchError(f"{path}: expected a result file, found a folder or special file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KvbenchError(f"{path}: cannot read ({error.strerror or error})") from None
    lines = data.split(b"\n")
    unfinished = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise KvbenchError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line); "
                               "delete or repair the line") from None
        except (json.JSONDecodeError, RecursionError):
            raise KvbenchError(f"{path}:{number}: not a JSON line; delete or repair the line") from None
        if not isinstance(row, dict) or not valid_id(row.get("_id")):
            raise KvbenchError(f"{path}:{number}: a result row must be a JSON object with a string or integer _id")
        rows.append(row)
    return rows, len(unfinished)


def read_rows_for_resume(path: Path) -> list[dict[str, Any]]:
    """Finished rows of a result file the caller is about to append to (it holds the folder's lock):
    a last line cut short by a kill is cut off the file, and its sample is done again."""
    rows, unfinished_bytes = parse_result_file(path)
    if unfinished_bytes:
        with open(path, "rb+") as handle:
            handle.truncate(os.path.getsize(path) - unfinished_bytes)
    return rows


def read_finished_rows(path: Path) -> list[dict[str, Any]]:
    """Finished rows of a result file, first row of each ``_id``; changes no file (a run may be writing it)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in parse_result_file(path)[0]:
        rows.setdefault(str(row["_id"]), row)
    return list(rows.values())


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and make it durable before returning: a finished sample survives a kill or a crash.

    The line goes out in one ``write`` on an append-only descriptor, under an exclusive ``flock``
    of the file: processes of a data-parallel run append to one file and their lines never
    interleave, and a kill cannot cut a line in the middle of the file (a signal is delivered
    between system calls; only a crash of the machine can leave a last line without its newline).
    """
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        written = 0
        while written < len(data):
            written += os.write(descriptor, data[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)  # closing releases the flock


# -- the lock -----------------------------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as one process runs on the folder.

    A second process is refused at once in one line. The kernel releases the lock when its
    holder exits, however it exits, so a killed run never leaves the folder locked.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None

    def __enter__(self) -> RunLock:
        try:
            self._handle = open(self.path, "a+")
        except OSError as error:
            raise KvbenchError(f"{self.path.parent}: cannot write in the run folder ({error.strerror or error})") from None
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._handle.close()
            self._handle = None
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise KvbenchError(f"{self.path.parent}: another kvbench process is running on this run folder; "
                                   "wait for it or use another --output") from None
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None


def check_writable_folder(folder: Path, option: str) -> None:
    """Refuse, before any slow work, an output folder that is a file, lies under a file, or cannot be written."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == folder else f"lies under the file {parent}"
                raise KvbenchError(f"{option} {folder}: {where}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise KvbenchError(f"{option} {folder}: {parent} is not writable")
            return


# -- run identity ----------------------------------------------------------------------------------------


def identity_differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: recorded -> current"`` for each setting whose value differs (nested dicts compared key by key)."""
    differences = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += identity_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def file_digest(path: Path) -> str:
    """sha256 of a file's content, in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
