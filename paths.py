"""Where kvbench keeps things: its cache home, the default results folder, and data shipped in packages.

Imported by every layer (tasks, methods, classifier, harness, report), so it imports
nothing heavier than the standard library.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kvbench.errors import KvbenchError

#: the checkout's root when kvbench runs from one (the repository root is the package)
PACKAGE_ROOT = Path(__file__).resolve().parent


def kvbench_home() -> Path:
    """Where kvbench keeps converted models, classifier checkpoints, profiles and LongBench: $KVBENCH_HOME."""
    return Path(os.environ.get("KVBENCH_HOME", Path.home() / ".cache" / "kvbench"))


def default_output_dir() -> Path:
    """Where runs land without --output: `results/` of the checkout when kvbench runs from one, else ./results."""
    return PACKAGE_ROOT / "results" if (PACKAGE_ROOT / "setup.cfg").is_file() else Path.cwd() / "results"


def package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package that ships data (model, encoder, haystack), found without importing it.

    Importing would run the package's __init__, which for these asset packages pulls in
    libraries kvbench does not need (llama.cpp bindings, for one).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KvbenchError(install_hint)
    return Path(list(spec.submodule_search_locations)[0])


def module_available(module: str) -> bool:
    """Whether an optional dependency (gguf, flash_attn, triton, Levenshtein) is installed, without importing it."""
    return importlib.util.find_spec(module) is not None
