"""The `kvbench` command line: thin click commands over the library functions."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from kvbench.errors import KvbenchError


def one_line_errors(command):
    """Turn a KvbenchError into one `error: ...` line on stderr and exit status 2."""

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


@main.command("eval")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='also write {"<task>": score, ...} to this file')
@click.option("--longbench-e", is_flag=True, help="also score each LongBench-E length bucket (0-4k, 4-8k, 8k+)")
@click.option("--against-run", type=click.Path(path_type=Path), default=None,
              help="a reference run folder (e.g. fullkv): add ROUGE-L of each prediction against its prediction")
@one_line_errors
def eval_command(path, json_file, longbench_e, against_run):
    """Score LongBench predictions: a folder of <task>.jsonl files (pred, answers, all_classes, length) or one file."""
    from kvbench.tasks.evaluate import evaluate_path, fidelity_to_reference, format_score_table, write_scores_json

    table = evaluate_path(path, longbench_e=longbench_e)
    if against_run is not None:
        table = fidelity_to_reference(table, path, against_run)
    for note in table.attrs["skipped"]:
        click.echo(f"note: skipped {note}", err=True)
    click.echo(format_score_table(table))
    if json_file is not None:
        write_scores_json(table, json_file)


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
@click.option("--lengths", default=None, help="needle: context lengths, START:STOP:COUNT or a comma list [1000:8000:8]")
@click.option("--depths", default=None, help="needle: depth percents, START:STOP:COUNT or a comma list [0:100:11]")
@click.option("--needle", default=None, help="needle: the sentence hidden in the haystack")
@click.option("--question", default=None, help="needle: the question asked about it")
@click.option("--answer", default=None, help="needle: the reference answer scored against")
@click.option("--haystack-dir", type=click.Path(), default=None, help="needle: folder of .txt files [Paul Graham essays]")
@_method_option_flags
@one_line_errors
def run_command(method_name, capacity, task_spec, data_dir, limit, max_length, output, model, dtype, attn, device,
                device_map, trust_remote_code, lengths, depths, needle, question, answer, haystack_dir,
                **method_options):
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
    needle_options = dict(lengths=lengths, depths=depths, needle=needle, question=question, answer=answer,
                          haystack_dir=haystack_dir)
    tasks = [get_task(name, **needle_options) for name in resolve_task_names(task_spec)]
    loaded = load_model(model, dtype=dtype, attn=attn, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code)
    plan = RunPlan(tasks=tasks, data_dir=data_dir, limit=limit, max_length=max_length,
                   output_dir=Path(output) if output else default_output_dir())
    run_dir, scores = run_benchmark(loaded, method, plan)
    click.echo(f"results: {run_dir}")
    for task_name, score in scores.items():
        value = "-" if score.get("score") is None else f"{score['score']:.2f}"
        click.echo(f"{task_name:24s} n={score['n']:<5d} {value}")


@main.command("bench")
@click.option("--model", default=None,
              help="llama3-8b / mistral-7b / qwen2.5-7b (random weights of that shape), or a model as for `run`")
@click.option("--methods", "method_specs", default="fullkv,snapkv,pyramidkv", show_default=True,
              help="comma list; options as name:option=value, e.g. windowkv:shared_layers=1:task_type=qa")
@click.option("--lengths", default="16384,32768", show_default=True, help="prompt lengths in tokens")
@click.option("--capacity", type=int, default=512, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True, help="tokens decoded per run")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed runs per method and length (median)")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--attn", default="sdpa", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(), default="results/bench", show_default=True, help="folder for bench.csv / bench.md")
@one_line_errors
def bench_command(model, method_specs, lengths, capacity, new_tokens, repeats, dtype, attn, device, out):
    """Prefill time, decode speed and peak memory of methods side by side, medians from one run."""
    from kvbench.harness.bench import device_description, load_bench_model, run_bench, write_bench

    try:
        length_list = [int(value) for value in lengths.split(",")]
    except ValueError:
        raise KvbenchError(f"--lengths must be a comma list of integers, got {lengths!r}") from None
    if repeats <= 0 or new_tokens <= 0:
        raise KvbenchError("--repeats and --new-tokens must be > 0")
    loaded = load_bench_model(model, dtype, attn, device)
    table = run_bench(loaded, method_specs.split(","), length_list, capacity, new_tokens, repeats,
                      progress=lambda line: click.echo(line, err=True))
    device_name = device_description(loaded.model)
    header = (f"model {loaded.name}, {str(loaded.model.dtype).replace('torch.', '')}, attention {attn}, "
              f"device {device_name}, capacity {capacity}, {new_tokens} decoded tokens, median of {repeats}")
    write_bench(table, Path(out), header)
    click.echo(header)
    click.echo(table.to_markdown(index=False))


@main.command("report")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the report (default: <first RUN_DIR>/report)")
@click.option("--format", "format_list", default="md,csv,html", show_default=True, help="comma list of md, csv, html")
@one_line_errors
def report_command(run_dirs, out, format_list):
    """Tables, needle heatmaps and capacity plots of every run under RUN_DIR... (default: the results folder)."""
    from kvbench.results.report import parse_formats, write_report

    for path in write_report(run_dirs, out, parse_formats(format_list)):
        click.echo(path)


@main.command("profile")
@click.option("--method", "method_name", default="prefixkv", show_default=True, help="method to profile (prefixkv)")
@click.option("--model", default=None, help="hub id, local folder or .gguf file [default: embedded SmolLM2-135M-Instruct]")
@click.option("--ratio", type=float, required=True, help="fraction of the prompt dropped, 0 <= R < 1")
@click.option("--data-dir", type=click.Path(), default=None, help="folder of LongBench <task>.jsonl files (default: the hub)")
@click.option("--samples", type=int, default=64, show_default=True, help="calibration prompts, round-robin over the tasks")
@click.option("--tasks", "task_spec", default="longbench", show_default=True, help="tasks the calibration prompts come from")
@click.option("--max-length", type=int, default=None, help="prompt tokens kept, as for `run`")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the per-task shuffle")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="config file [default: KVBENCH_HOME/prefixkv/prefixkv_<model>_<ratio>.json, where `run` looks]")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--attn", default="sdpa", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--device-map", default=None)
@click.option("--trust-remote-code", is_flag=True)
@one_line_errors
def profile_command(method_name, model, ratio, data_dir, samples, task_spec, max_length, seed, out, dtype, attn,
                    device, device_map, trust_remote_code):
    """Offline per-layer budgets for PrefixKV from calibration prompts (used by `run --method prefixkv`)."""
    from kvbench.methods.prefixkv_profile import run_profile

    path, config = run_profile(method_name, model, ratio, data_dir, samples, out, task_spec, max_length, seed, dtype,
                               attn, device, device_map, trust_remote_code, progress=lambda line: click.echo(line, err=True))
    ratios = config["layer_ratios"]
    click.echo(f"{path}: {config['model']}, ratio {config['ratio']}, {config['samples']} prompts, "
               f"per-layer drop {min(ratios):.3f}..{max(ratios):.3f}")


@main.command("train-classifier")
@click.option("--data-dir", "data_dirs", type=click.Path(), multiple=True,
              help="folder of LongBench <task>.jsonl files; repeat to merge folders (default: the hub)")
@click.option("--tasks", "task_list", default=None, help="comma list of LongBench tasks [default: all in the data]")
@click.option("--encoder", default="all-MiniLM-L6-v2", show_default=True,
              help="the embedded all-MiniLM-L6-v2, or a BERT-style hub id / local folder (bert-base-cased: the paper's)")
@click.option("--epochs", type=int, default=10, show_default=True, help="passes over the training split")
@click.option("--learning-rate", type=float, default=1e-3, show_default=True,
              help="AdamW's, for the encoder's last layer, its pooler if used, and the head")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--held-out-fraction", type=float, default=0.2, show_default=True, help="share of each task held out")
@click.option("--held-out-tasks", default="per-category", show_default=True,
              help="tasks scored by a model trained without them: per-category (first task of each), all, none, or a comma list")
@click.option("--max-samples-per-task", type=click.IntRange(min=1), default=None, help="seeded random subset of each task")
@click.option("--seed", type=int, default=0, show_default=True, help="split, initialisation and shuffling")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="checkpoint folder [default: KVBENCH_HOME/classifier, where `run --method windowkv` looks]")
@one_line_errors
def train_classifier_command(data_dirs, task_list, encoder, epochs, learning_rate, batch_size, held_out_fraction,
                             held_out_tasks, max_samples_per_task, seed, device, out):
    """Train WindowKV's task classifier (qa vs other) on LongBench prompts labelled by task category."""
    from kvbench.classifier import default_checkpoint_path, save_checkpoint
    from kvbench.classifier.data import load_labelled_prompts, parse_task_names
    from kvbench.classifier.model import MAX_LENGTH
    from kvbench.classifier.train import TrainingConfig, format_confusion_matrix, train_classifier

    config = TrainingConfig(encoder=encoder, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                            held_out_fraction=held_out_fraction, held_out_tasks=held_out_tasks, seed=seed, device=device)
    config.validate()
    prompts = load_labelled_prompts(data_dirs, parse_task_names(task_list), max_samples_per_task, seed)
    result = train_classifier(prompts, config, report=lambda line: click.echo(line, err=True))
    summary = result.summary
    summary["data"] = list(data_dirs) or ["hub"]
    held_out = summary["held_out"]
    click.echo(f"held-out accuracy {held_out['accuracy']:.3f} (balanced {held_out['balanced_accuracy']:.3f}, "
               f"n={summary['held_out_prompts']})")
    click.echo(format_confusion_matrix(held_out["confusion_matrix"]))
    tasks = summary["held_out_tasks"]
    if tasks["overall"] is not None:
        per_task = ", ".join(f"{task} {accuracy:.2f}" for task, accuracy in tasks["accuracy_per_task"].items())
        click.echo(f"held-out-task accuracy {tasks['mean_over_tasks']:.3f} mean over tasks, "
                   f"{tasks['overall']['accuracy']:.3f} over prompts (balanced {tasks['overall']['balanced_accuracy']:.3f}): "
                   f"{per_task}")
    folder = save_checkpoint(result.model, encoder, MAX_LENGTH, summary, out or default_checkpoint_path())
    click.echo(f"checkpoint: {folder}")
