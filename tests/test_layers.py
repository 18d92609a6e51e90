"""The package's layers import one way (README, "How the code is organised"), read from the source's imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def kvbench_imports(folder: str) -> dict:
    """{module file: set of kvbench modules it imports} for every file of a top-level folder."""
    imports = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvbench"):
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("kvbench"))
        imports[path.name] = names
    return imports


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvbench"


def test_the_engine_knows_methods_only_through_their_base_interface():
    imports = kvbench_imports("engine")
    assert {"hook.py", "prefill.py", "decode.py", "chunked.py", "generate.py"} <= set(imports)
    for name, modules in imports.items():
        for module in modules:
            allowed = module.startswith(("kvbench.engine", "kvbench.errors", "kvbench.methods.base"))
            # `from kvbench.methods.base import X` also lists kvbench.methods.base.X
            assert allowed, f"engine/{name} imports {module}"


@pytest.mark.parametrize("folder", ["tasks", "methods"])
def test_tasks_and_methods_know_nothing_of_the_engine_the_harness_or_the_report(folder):
    for name, modules in kvbench_imports(folder).items():
        layers = {layer_of(module) for module in modules}
        assert not layers & {"engine", "harness", "report", "cli"}, f"{folder}/{name} imports {sorted(modules)}"


def test_the_report_reads_run_folders_without_the_engine_or_the_harness():
    for name, modules in kvbench_imports("report").items():
        layers = {layer_of(module) for module in modules}
        assert not layers & {"engine", "harness", "methods", "classifier"}, f"report/{name} imports {sorted(modules)}"
