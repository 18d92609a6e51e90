"""Shared test fixtures: where the LongBench samples beside the checkout live."""

import os
from pathlib import Path

import pytest

# Tests never reach the hub: code that would download says so at once instead.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
LONGBENCH_MINI = SHARED_DATA / "longbench-mini"
LONGBENCH_FULL = SHARED_DATA / "longbench"


@pytest.fixture
def longbench_mini() -> Path:
    if not LONGBENCH_MINI.is_dir():
        pytest.skip(f"{LONGBENCH_MINI} not present")
    return LONGBENCH_MINI
