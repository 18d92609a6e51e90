"""Reading JSON-lines data and prediction files, every fault reported as one line naming file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; any unreadable line is a KvbenchError naming file and line."""
    if Path(path).is_dir():
        raise KvbenchError(f"{path}: is a folder, expected a .jsonl file")
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise KvbenchError(f"{path}: cannot read ({error.strerror})") from None
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise KvbenchError(f"{path}:{line_number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise KvbenchError(f"{path}:{line_number}: not valid JSON ({error.msg} at character {error.pos + 1})") from None
            except RecursionError:
                raise KvbenchError(f"{path}:{line_number}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise KvbenchError(f"{path}:{line_number}: expected a JSON object, found {type(row).__name__}")
            yield line_number, row
