"""What long work shows on the terminal: progress bars on one, nothing on a pipe or in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


def progress_bars_enabled() -> bool:
    """Progress bars only on a terminal: piped into a log, tqdm's redraws would be hundreds of lines."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress_bar(iterable=None, disable: bool = False, **options) -> tqdm:
    """tqdm, drawn only when `progress_bars_enabled`."""
    return tqdm(iterable, disable=disable or not progress_bars_enabled(), **options)


@contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (downloads, loading weights) off for a while unless ``enabled``, as before after."""
    from transformers.utils import logging as transformers_logging

    were_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_enabled and not enabled:
            transformers_logging.enable_progress_bar()
