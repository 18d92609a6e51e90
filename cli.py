"""The `kvbench` command line: thin click commands over the library functions."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from kvbench.errors import KvbenchError


def one_line_errors(command):
    """Turn a KvbenchError (and a missing file or a broken pipe) into one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KvbenchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvbench")
def main():
    """kvbench: KV-cache compression methods on LongBench and Needle-in-a-Haystack."""


def _method_option_flags(command):
    """Add one flag per option of every registered method (default None: the method's own default)."""
    from kvbench.methods import REGISTRY

    seen: dict[str, object] = {}
    for method_class in REGISTRY.values():
        for option in method_class.options:
            if option.name in seen:
                continue
            seen[option.name] = option
    for option in sorted(seen.values(), key=lambda o: o.name, reverse=True):
        flag = option.name.replace("_", "-")
        defaults = sorted(
            f"{name}: {o.default}" for name, cls in REGISTRY.items() for o in cls.options if o.name == option.name
        )
        help_text = f"{option.help} [default {'; '.join(defaults)}]"
        if option.type is bool:
            command = click.option(f"--{flag}/--no-{flag}", option.name, default=None, help=help_text)(command)
        else:
            kind = click.Choice([str(c) for c in option.choices]) if option.choices else option.type
            command = click.option(f"--{flag}", option.name, type=kind, default=None, help=help_text)(command)
    return command


@main.command("methods")
def methods_command():
    """List the compression methods with their options and defaults."""
    from kvbench.methods import REGISTRY

    for name in sorted(REGISTRY):
        method_class = REGISTRY[name]
        click.echo(f"{name:10s} {method_class.description}")
        for option in method_class.options:
            click.echo(f"{'':12s}--{option.name.replace('_', '-'):20s} {option.help} (default {option.default})")


@main.command("run")
@click.option("--method", "method_name", default="fullkv", show_default=True, help="compression method (see `kvbench methods`)")
@click.option("--capacity", type=int, default=None, help="tokens kept per layer per KV head, observation window included")
@click.option("--tasks", "task_spec", default="longbench", show_default=True,
              help="comma list of tasks, or longbench / longbench-e / needle")
@click.option("--data-dir", type=click.Path(), default=None, help="folder of LongBench <task>.jsonl files (default: the hub)")
@click.option("--limit", type=int, default=None, help="first K samples of each task")
@click.option("--max-length", type=int, default=None, help="prompt tokens kept (middle truncation); default: context window - generation length")
@click.option("--output", type=click.Path(), default=None, help="results folder [default: results/]")
@click.option("--model", default=None, help="hub id, local folder or .gguf file [default: embedded SmolLM2-135M-Instruct]")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
@click.option("--attn", default="sdpa", show_default=True, help="sdpa, flash_attention_2 or eager")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--device-map", default=None, help="e.g. auto, to spread a large model over GPUs")
@click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub")
@_method_option_flags
@one_line_errors
def run_command(method_name, capacity, task_spec, data_dir, limit, max_length, output, model, dtype, attn, device,
                device_map, trust_remote_code, **method_options):
    """Run a method over LongBench / the needle test; rows land in OUTPUT/<model>/<method>-<capacity>/."""
    from kvbench.harness.model import load_model
    from kvbench.harness.run import RunPlan, default_output_dir, run_benchmark
    from kvbench.methods import build_method
    from kvbench.tasks import get_task, resolve_task_names

    if limit is not None and limit <= 0:
        raise KvbenchError(f"--limit must be > 0, got {limit}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise KvbenchError(f"--data-dir {data_dir}: no such folder")
    method = build_method(method_name, capacity=capacity, **method_options)
    tasks = [get_task(name) for name in resolve_task_names(task_spec)]
    loaded = load_model(model, dtype=dtype, attn=attn, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code)
    plan = RunPlan(tasks=tasks, data_dir=data_dir, limit=limit, max_length=max_length,
                   output_dir=Path(output) if output else default_output_dir())
    run_dir, scores = run_benchmark(loaded, method, plan)
    click.echo(f"results: {run_dir}")
    for task_name, score in scores.items():
        value = "-" if score.get("score") is None else f"{score['score']:.2f}"
        click.echo(f"{task_name:24s} n={score['n']:<5d} {value}")
