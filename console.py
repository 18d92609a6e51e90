"""What long work shows on the terminal: progress bars on one, nothing on a pipe or in a log file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: the switches other libraries read when they are imported: tqdm's own (every library's bar that calls
#: tqdm directly, like transformers' GGUF conversion), huggingface_hub's (downloads; transformers takes it as
#: its default) and datasets'
THIRD_PARTY_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def progress_bars_enabled() -> bool:
    """Progress bars only on a terminal: piped into a log, tqdm's redraws would be hundreds of lines."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress_bar(iterable=None, disable: bool = False, **options):
    """tqdm, drawn only when `progress_bars_enabled`."""
    from tqdm import tqdm

    return tqdm(iterable, disable=disable or not progress_bars_enabled(), **options)


def quiet_third_party_progress_bars() -> None:
    """Other libraries' bars off, as ours are, when the output is not a terminal: the command line calls this
    before anything imports them (they read these switches then). A variable the user set is left as it is."""
    if not progress_bars_enabled():
        for name, value in THIRD_PARTY_BARS_OFF.items():
            os.environ.setdefault(name, value)


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
