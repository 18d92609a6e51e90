"""Checks that a command runs without importing torch (in a fresh interpreter, where nothing imported it yet)."""

import subprocess
import sys


def assert_runs_without_torch(args: list[str]) -> None:
    script = (
        "import sys\n"
        "from kvbench.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        f"assert 'torch' not in sys.modules, 'kvbench {args[0]} imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
