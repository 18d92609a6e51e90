"""The `kvbench` command line: thin click commands over the library functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from kvbench.console import quiet_third_party_progress_bars
from kvbench.errors import KvbenchError
from kvbench.intervals import DEFAULT_SEED, RESAMPLES


class KvbenchGroup(click.Group):
    """The command group, with two jobs besides dispatching.

    * Every mistake the user can fix is one ``error: ...`` line on stderr and exit status 2:
      kvbench's own (KvbenchError) and click's usage errors alike (click would print a usage
      block and ``Error:``).
    * Other libraries' progress bars follow kvbench's rule (`kvbench.console`): none off a terminal.
    * Commands registered with `lazy_command` are built on first use: `run`'s flags come from
      the method registry, which imports torch, and `kvbench eval` / `kvbench report` must start
      without it.
    """

    lazy_builders: dict = {}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_builders})

    def get_command(self, ctx, name):
        if name in self.lazy_builders and name not in self.commands:
            self.add_command(self.lazy_builders[name](), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        quiet_third_party_progress_bars()
        use_expandable_cuda_segments()
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except KvbenchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except click.exceptions.UsageError as error:
            command = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
            click.echo(f"error: {error.format_message()}{command}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.exceptions.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


def use_expandable_cuda_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments in place (unless the user configured it): a grid's decode pool grows
    layer by layer beside prefills of different lengths, and on an H100 grid the memory that left in pieces (15.8 GiB
    reserved but unallocated) made the decode step's CUDA graph capture fail for 112 MiB; with expandable segments
    every capture held. It must be set before CUDA's first allocation, so here, before any command runs."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


@click.group(cls=KvbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvbench")
def main():
    """kvbench: KV-cache compression methods on LongBench and Needle-in-a-Haystack."""


def lazy_command(name: str):
    """Register a function that builds a command when it is first used (see `KvbenchGroup`)."""

    def register(builder):
        KvbenchGroup.lazy_builders[name] = builder
        return builder

    return register


def _method_option_flags(command):
    """One flag per declared option of every registered method (default None: unset, the method's default).

    ``--capacity`` is the run's own flag (a comma list for grids), so it is not repeated here.
    """
    from kvbench.methods import all_option_specs

    for name, owners in sorted(all_option_specs().items(), reverse=True):
        if name == "capacity":
            continue
        spec = owners[0][1]
        defaults = "; ".join(f"{method}: {owner_spec.default}" for method, owner_spec in owners)
        help_text = f"{spec.help} [{', '.join(method for method, _ in owners)}; default {defaults}]"
        if spec.type is bool:
            command = click.option(f"{spec.flag}/--no-{spec.flag[2:]}", name, default=None, help=help_text)(command)
        else:
            kind = click.Choice([str(c) for c in spec.choices]) if spec.choices else spec.type
            command = click.option(spec.flag, name, type=kind, default=None, help=help_text)(command)
    return command


@main.command("methods")
def methods_command():
    """List the compression methods with their options and defaults."""
    from kvbench.methods import REGISTRY

    width = max(map(len, REGISTRY)) + 2
    for name in sorted(REGISTRY):
        method_class = REGISTRY[name]
        click.echo(f"{name:{width}s}{method_class.description}")
        for spec in method_class.option_specs():
            click.echo(f"{'':{width + 2}s}{spec.flag:22s} {spec.help} (default {spec.default})")


def _comma_list(text: str | None, option: str, parse=str) -> list:
    if text is None:
        return []
    try:
        values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KvbenchError(f"{option} must be a comma list of {'integers' if parse is int else 'values'}, "
                           f"got {text!r}") from None
    if not values:
        raise KvbenchError(f"{option} is empty")
    return values


def _batch_size(text: str) -> int | None:
    """``--batch-size``: a positive integer, or auto (None: the engine's default for the device)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise KvbenchError(f"--batch-size must be a positive integer or auto, got {text!r}") from None
    if value <= 0:
        raise KvbenchError(f"--batch-size must be a positive integer or auto, got {value}")
    return value


BATCH_INVARIANT_OPTION = click.option(
    "--batch-invariant/--no-batch-invariant", default=None,
    help="decode with batch-invariant kernels: a sample's tokens do not depend on the batch size or on the samples "
         "decoded beside it (CUDA only; part of a run's identity) [default: on for CUDA with Llama, Mistral, Qwen2 "
         "and Qwen3 models, off otherwise]")

CODE_SIM_OPTION = click.option(
    "--code-sim-matcher", type=click.Choice(["levenshtein", "difflib"]), default="levenshtein", show_default=True,
    help="fuzzywuzzy's matcher for lcc / repobench-p: python-Levenshtein (what KVCache-Factory's published numbers "
         "used) or the pure-Python difflib")


SEED_OPTION = click.option(
    "--seed", type=click.IntRange(min=0), default=DEFAULT_SEED, show_default=True,  # numpy's seeds are >= 0
    help=f"seed of the {RESAMPLES} bootstrap resamples behind each 95% interval (the same seed, the same intervals)")


@main.command("eval")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='also write {"<task>": score, ...} to this file')
@click.option("--longbench-e", is_flag=True, help="also score each LongBench-E length bucket (0-4k, 4-8k, 8k+)")
@click.option("--against-run", type=click.Path(path_type=Path), default=None,
              help="a reference run folder (e.g. fullkv): add the paired score difference from it on the shared "
                   "samples, and ROUGE-L of each prediction against its prediction")
@CODE_SIM_OPTION
@SEED_OPTION
def eval_command(path, json_file, longbench_e, against_run, code_sim_matcher, seed):
    """Score LongBench predictions: a folder of <task>.jsonl files (pred, answers, all_classes, length) or one file."""
    from kvbench.tasks.evaluate import compare_with_reference, evaluate_path, format_score_table, write_scores_json
    from kvbench.tasks.metrics import using_code_sim_matcher

    with using_code_sim_matcher(code_sim_matcher):
        table = evaluate_path(path, longbench_e=longbench_e, seed=seed)
        if against_run is not None:
            table = compare_with_reference(table, path, against_run)
    for note in table.attrs["skipped"]:
        click.echo(f"note: skipped {note}", err=True)
    click.echo(format_score_table(table))
    if table["task"].str.removesuffix("_e").isin(["lcc", "repobench-p"]).any():
        click.echo(f"(lcc and repobench-p scored with fuzzywuzzy's ratio on the {code_sim_matcher} matcher)")
    if json_file is not None:
        write_scores_json(table, json_file)


@lazy_command("run")
def _build_run_command():
    # Built on first use: its method flags come from the registry, which imports torch.
    @click.command("run")
    @click.option("--method", "method_names", default="fullkv", show_default=True,
                  help="compression method, or a comma list for a grid (see `kvbench methods`)")
    @click.option("--capacity", "capacities", default=None,
                  help="tokens kept per layer per KV head, observation window included; a comma list for a grid")
    @click.option("--tasks", "task_spec", default="longbench", show_default=True,
                  help="comma list of tasks, or longbench / longbench-e / needle / ruler")
    @click.option("--data-dir", type=click.Path(), default=None,
                  help="folder of LongBench <task>.jsonl files, and of RULER's squad.json / hotpotqa.json (default: the hub)")
    @click.option("--limit", type=int, default=None, help="first K samples of each task")
    @click.option("--max-length", type=int, default=None, help="prompt tokens kept (middle truncation); default: context window - generation length")
    @click.option("--output", type=click.Path(), default=None, help="results folder [default: results/]")
    @click.option("--model", default=None, help="hub id, local folder or .gguf file [default: embedded SmolLM2-135M-Instruct]")
    @click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    @click.option("--attn", default="sdpa", show_default=True, help="sdpa, flash_attention_2 or eager")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
    @click.option("--device-map", default=None, help="e.g. auto, to spread a large model over GPUs")
    @click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub")
    @CODE_SIM_OPTION
    @click.option("--batch-size", default="auto", show_default=True,
                  help="rows decoded together (continuous batching; a grid decodes its configurations' rows together); "
                       "auto: on CUDA as many as free memory holds, up to the measured fastest per token; 4 on CPU")
    @BATCH_INVARIANT_OPTION
    @click.option("--question-agnostic", is_flag=True,
                  help="compress each prompt's context before its question is seen; the question then extends the "
                       "compressed cache whole (its own run folder, <method>-<capacity>-question-agnostic)")
    @click.option("--lengths", default=None, help="needle: context lengths, START:STOP:COUNT or a comma list "
                  "[1000:8000:8]; ruler: lengths, prompt plus answer, in the model's tokens [4096]")
    @click.option("--depths", default=None, help="needle: depth percents, START:STOP:COUNT or a comma list [0:100:11]")
    @click.option("--needle", default=None, help="needle: the sentence hidden in the haystack")
    @click.option("--question", default=None, help="needle: the question asked about it")
    @click.option("--answer", default=None, help="needle: the reference answer scored against")
    @click.option("--haystack-dir", type=click.Path(), default=None,
                  help="needle, ruler: folder of .txt files [Paul Graham essays]")
    @click.option("--seed", default=None, help="ruler: seed the samples are drawn from [42]")
    @click.option("--num-samples", type=int, default=None, help="ruler: samples per task and length [500]")
    @_method_option_flags
    def run_command(method_names, capacities, task_spec, data_dir, limit, max_length, output, model, dtype, attn, device,
                    device_map, trust_remote_code, code_sim_matcher, batch_size, batch_invariant, question_agnostic, lengths,
                    depths, needle, question, answer, haystack_dir, seed, num_samples, **method_options):
        """Run methods over LongBench / the needle test / RULER; rows land in OUTPUT/<model>/<method>-<capacity>/.

        Comma lists in --method and --capacity make a grid: the model loads once and each (method, capacity)
        fills its own run folder; an option applies to the listed methods that have it.
        """
        from kvbench.harness.grid import GridRequest, run_grid
        from kvbench.tasks.metrics import using_code_sim_matcher

        if limit is not None and limit <= 0:
            raise KvbenchError(f"--limit must be > 0, got {limit}")
        if max_length is not None and max_length <= 0:
            raise KvbenchError(f"--max-length must be > 0, got {max_length}")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise KvbenchError(f"--data-dir {data_dir}: no such folder")
        request = GridRequest(
            method_names=_comma_list(method_names, "--method"),
            capacities=_comma_list(capacities, "--capacity", int),
            method_options={key: value for key, value in method_options.items() if value is not None},
            task_spec=task_spec,
            task_options=dict(lengths=lengths, depths=depths, needle=needle, question=question, answer=answer,
                              haystack_dir=haystack_dir, seed=seed, num_samples=num_samples),
            data_dir=data_dir, limit=limit, max_length=max_length, output=output, model=model, dtype=dtype, attn=attn,
            device=device, device_map=device_map, trust_remote_code=trust_remote_code,
            batch_size=_batch_size(batch_size), batch_invariant=batch_invariant, question_agnostic=question_agnostic,
        )
        with using_code_sim_matcher(code_sim_matcher):
            run_grid(request, echo=click.echo, progress=lambda line: click.echo(line, err=True))

    return run_command


@main.command("bench")
@click.option("--workload", type=click.Choice(["prompts", "decode", "longbench"]), default="prompts", show_default=True,
              help="prompts: methods x prompt lengths, alone; decode: the decode step at several batch sizes; "
                   "longbench: the run loop's engine over LongBench-shaped work, alone and batched (--grid: a grid "
                   "sharing prefills, beside its configurations one by one)")
@click.option("--model", default=None,
              help="llama3-8b / mistral-7b / qwen2.5-7b (random weights of that shape), or a model as for `run`")
@click.option("--methods", "method_specs", default="fullkv,snapkv,pyramidkv", show_default=True,
              help="comma list; options as name:option=value, e.g. windowkv:shared_layers=1:task_type=qa")
@click.option("--lengths", default="16384,32768", show_default=True, help="prompts: prompt lengths in tokens")
@click.option("--capacity", "capacities", default="512", show_default=True,
              help="token budget of the methods that have one; a comma list with --workload longbench --grid")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="prompts: tokens decoded per run")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="prompts: timed runs per method and length (median); decode: rounds (the first is discarded)")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="decode: rows per step")
@click.option("--cache-tokens", type=int, default=576, show_default=True, help="decode: cached tokens per row and layer")
@click.option("--steps", type=int, default=50, show_default=True, help="decode: timed steps per batch size and round")
@click.option("--data-dir", type=click.Path(), default=None, help="longbench: folder of <task>.jsonl (the mini set)")
@click.option("--limit", type=int, default=None, help="longbench: first K samples of each task")
@click.option("--alone-limit", type=int, default=1, show_default=True,
              help="longbench: samples of each task also run alone (batch 1); with --grid, run one by one (0: not)")
@click.option("--batch-size", default="32", show_default=True,
              help="longbench: rows of the batched run, or auto (as `run --batch-size auto`)")
@click.option("--grid", is_flag=True,
              help="longbench: every method x capacity in one stream sharing each sample's prefill (as `run` runs a "
                   "grid), beside the same configurations one by one on --alone-limit samples of each task")
@click.option("--alone-eager", is_flag=True, help="longbench: also decode the batch-1 samples without CUDA graphs")
@BATCH_INVARIANT_OPTION
@click.option("--max-length", type=int, default=None, help="longbench: prompt tokens kept, as for `run`")
@click.option("--tokenizer", default=None,
              help="longbench: tokenizer (folder or hub id) building the prompts [default: the model's, else the "
                   "embedded SmolLM2's]")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--attn", default="sdpa", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(), default="results/bench", show_default=True, help="folder for bench.csv / bench.md")
def bench_command(workload, model, method_specs, lengths, capacities, new_tokens, repeats, batch_sizes, cache_tokens,
                  steps, data_dir, limit, alone_limit, batch_size, grid, alone_eager, batch_invariant, max_length,
                  tokenizer, dtype, attn, device, out):
    """Speed and memory of the engine: prefill, decode and peak memory side by side, medians from one process."""
    from kvbench.engine.prefill import prefill_kernels
    from kvbench.harness import bench
    from kvbench.runfolder import check_writable_folder

    length_list = _comma_list(lengths, "--lengths", int)
    sizes = _comma_list(batch_sizes, "--batch-sizes", int)
    capacity_list = _comma_list(capacities, "--capacity", int)
    capacity = capacity_list[0]
    rows = _batch_size(batch_size)
    if grid and workload != "longbench":
        raise KvbenchError("--grid is an option of --workload longbench")
    if len(capacity_list) > 1 and not grid:
        raise KvbenchError("several --capacity values make a grid: use --workload longbench --grid")
    if rows is None and not grid:
        raise KvbenchError("--batch-size auto is an option of --workload longbench --grid")
    if min(length_list) <= 0 or min(sizes) <= 0:
        raise KvbenchError("--lengths and --batch-sizes must be positive")
    for name, value in (("--repeats", repeats), ("--new-tokens", new_tokens), ("--capacity", min(capacity_list)),
                        ("--cache-tokens", cache_tokens), ("--steps", steps), ("--batch-size", rows or 1)):
        if value <= 0:
            raise KvbenchError(f"{name} must be > 0, got {value}")
    if alone_limit < (0 if grid else 1):
        raise KvbenchError(f"--alone-limit must be {'>= 0 with --grid' if grid else '> 0'}, got {alone_limit}")
    if workload == "decode" and repeats < 2:
        raise KvbenchError("--repeats must be at least 2 for the decode workload (the first round is discarded)")
    if workload == "longbench" and (data_dir is None or not Path(data_dir).is_dir()):
        raise KvbenchError("the longbench workload needs --data-dir with <task>.jsonl files (e.g. the mini set)")
    specs = method_specs.split(",")
    bench.grid_configurations(specs, capacity_list)  # refuse bad specs before the model loads
    check_writable_folder(Path(out), "--out")
    invariant = bench.bench_batch_invariant(batch_invariant, model, device)
    loaded = bench.load_bench_model(model, dtype, attn, device)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    precision = str(loaded.model.dtype).replace("torch.", "")
    kernels = prefill_kernels(loaded.model)
    header = (f"model {loaded.name}, {precision}, prefill attention {kernels['prefill_attention']}, "
              f"RMSNorm {kernels['prefill_rms_norm']}, rotary and MLP gate {kernels['prefill_elementwise']}, "
              f"device {bench.device_description(loaded.model)}, "
              f"{'batch-invariant' if invariant else 'plain'} decode kernels")
    if workload == "prompts":
        table = bench.run_bench(loaded, specs, length_list, capacity, new_tokens, repeats, say, invariant)
        header += f", capacity {capacity}, {new_tokens} decoded tokens, median of {repeats}"
    elif workload == "decode":
        table = bench.run_decode_step_bench(loaded, sizes, cache_tokens, steps, repeats, say, (invariant,))
        header += f", {cache_tokens} cached tokens per row, median of {steps * (repeats - 1)} steps"
    elif grid:
        table, samples = bench.run_longbench_grid(loaded, bench.workload_tokenizer(loaded, tokenizer), specs,
                                                  capacity_list, data_dir, rows, limit, alone_limit, max_length, say,
                                                  invariant)
        extra = {"bench_samples.csv": samples}
        header += (f", capacities {','.join(map(str, capacity_list))}, LongBench prompts from {data_dir}, "
                   "stop tokens ignored; " + (f"one by one on the first {alone_limit} sample(s) of each task"
                                              if alone_limit else "not run one by one"))
    else:
        table, samples = bench.run_longbench_workload(
            loaded, bench.workload_tokenizer(loaded, tokenizer), specs, capacity, data_dir,
            rows, limit, alone_limit, max_length, say, alone_eager, invariant)
        extra = {"bench_samples.csv": samples}
        header += f", capacity {capacity}, LongBench prompts from {data_dir}, stop tokens ignored"
    bench.write_bench(table, Path(out), header, extra if workload == "longbench" else {})
    click.echo(header)
    click.echo(table.to_markdown(index=False))


@main.command("report")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the report (default: <first RUN_DIR>/report)")
@click.option("--format", "format_list", default="md,csv,html", show_default=True, help="comma list of md, csv, html")
@SEED_OPTION
def report_command(run_dirs, out, format_list, seed):
    """Tables, needle heatmaps and capacity plots of every run under RUN_DIR... (default: the results folder),
    each score with its 95% interval and each run's paired difference from the full cache."""
    from kvbench.report.write import parse_formats, write_report

    for path in write_report(run_dirs, out, parse_formats(format_list), seed):
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
def profile_command(method_name, model, ratio, data_dir, samples, task_spec, max_length, seed, out, dtype, attn,
                    device, device_map, trust_remote_code):
    """Offline per-layer budgets for PrefixKV from calibration prompts (used by `run --method prefixkv`)."""
    from kvbench.harness.profile import run_profile

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
def train_classifier_command(data_dirs, task_list, encoder, epochs, learning_rate, batch_size, held_out_fraction,
                             held_out_tasks, max_samples_per_task, seed, device, out):
    """Train WindowKV's task classifier (qa vs other) on LongBench prompts labelled by task category."""
    from kvbench.classifier import default_checkpoint_path, save_checkpoint
    from kvbench.classifier.data import load_labelled_prompts, parse_task_names
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
    folder = save_checkpoint(result.model, encoder, summary, out or default_checkpoint_path())
    click.echo(f"checkpoint: {folder}")
