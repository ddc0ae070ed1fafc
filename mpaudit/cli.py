"""The ``mpaudit`` command: parse options, call the library, map errors to exit codes, print.

Exit codes: 0 ran and every gate passed; 1 a gate failed; 2 usage or task-contract error (also an
unreadable result file); 3 an unexpected internal error (a bug: rerun with ``--debug`` and report it);
4 a rank of a distributed audit failed (the report holds the arms finished before it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mpaudit.defaults import (
    DEFAULT_ARMS,
    DEFAULT_BENCH_SECONDS,
    DEFAULT_DIST_TIMEOUT_S,
    DEFAULT_NOISE_K,
    DEFAULT_SPEEDUP_TOLERANCE,
    DEFAULT_STEPS,
    DEFAULT_TRACE_EVERY,
    DEFAULT_VERIFY_BUDGET,
)
from mpaudit.errors import (
    EXIT_FILE_ENV,
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_RANK_FAILED,
    EXIT_USAGE,
    ResultError,
    TaskError,
    UsageError,
)
from mpaudit.vocab import BASELINE, SEVERITIES

app = typer.Typer(
    help="Audit a PyTorch model for mixed precision: train it matched in fp32, bf16 and fp16, "
    "report what changed, and gate CI on the accuracy delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
METRIC_DIRECTION_HELP = ("NAME=min or NAME=max: lower (min) or higher (max) of this metric is better; overrides the task's "
                         "METRICS and the metric's name (repeatable).")

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _exits(debug_arg: str = "debug") -> Callable[[F], F]:
    """Map mpaudit's exceptions to one sentence on stderr and a documented exit code."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            debug = bool(kwargs.get(debug_arg))
            code = EXIT_OK
            try:
                return fn(*args, **kwargs)
            except typer.Exit as exc:
                code = exc.exit_code
                raise
            except (TaskError, UsageError, ResultError) as exc:
                code = EXIT_USAGE
                if debug:
                    raise
                err.print(f"[red]error:[/red]{_rank_prefix()} {escape(str(exc))}", markup=True)
                raise typer.Exit(EXIT_USAGE) from None
            except KeyboardInterrupt:
                code = 130
                err.print("interrupted")
                raise typer.Exit(130) from None
            except Exception as exc:
                code = EXIT_INTERNAL
                if debug:
                    raise
                err.print(f"[red]internal error:[/red]{_rank_prefix()} {type(exc).__name__}: {escape(str(exc))} "
                          "(rerun with --debug for the traceback)", markup=True)
                raise typer.Exit(EXIT_INTERNAL) from None
            finally:
                _record_exit_code(code)

        return inner  # type: ignore[return-value]

    return wrap


def _rank_prefix() -> str:
    """`` rank N:`` inside a torchrun job (every rank reports its own errors), empty otherwise."""
    return f" rank {os.environ['RANK']}:" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _record_exit_code(code: int) -> None:
    """Under ``mpaudit run --nproc``, rank 0 leaves its exit code where the launcher reads it (torchrun turns
    every failure into 1)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        with contextlib.suppress(OSError):
            Path(path).write_text(str(code))


@app.command()
@_exits()
def run(
    task: Annotated[Path, typer.Argument(help="The task file (model.py) to audit.", show_default=False)],
    arms: Annotated[str, typer.Option(help="Comma-separated arms to train, in order: fp32, bf16, fp16, bf16-pure (weights and optimizer state in bf16, no fp32 master copy; not a default).")] = ",".join(DEFAULT_ARMS),
    steps: Annotated[int | None, typer.Option(help=f"Optimizer steps per arm (default {DEFAULT_STEPS} unless --epochs).", show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over train_loader() per arm, instead of --steps.", show_default=False)] = None,
    clip_grad_norm: Annotated[float | None, typer.Option(help="Clip the gradient norm to this before every optimizer step (after GradScaler.unscale_ in fp16); overrides the task's clip_grad_norm.", show_default=False)] = None,
    grad_accumulation: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step (each loss divided by their count); overrides the task's grad_accumulation.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for Python, NumPy and torch before build_model() and train_loader().")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default reports/<task name>/).", show_default=False)] = None,
    max_drop: Annotated[list[str] | None, typer.Option("--max-drop", help="Gate: METRIC=DELTA, fail when an arm's metric is DELTA worse than fp32 (repeatable).", show_default=False)] = None,
    max_loss_gap: Annotated[float | None, typer.Option(help="Gate: fail when an arm's final training loss exceeds fp32's by more than this.", show_default=False)] = None,
    metric_direction: Annotated[list[str] | None, typer.Option("--metric-direction", help=METRIC_DIRECTION_HELP, show_default=False)] = None,
    seeds: Annotated[int, typer.Option(help="Train every arm with this many seeds (same data order) to measure fp32's seed noise; needed by METRIC=auto.")] = 1,
    noise_k: Annotated[float, typer.Option(help="--max-drop METRIC=auto allows a drop of this many standard deviations of fp32's seed noise.")] = DEFAULT_NOISE_K,
    trace_every: Annotated[int, typer.Option(help="Trace per-layer numerics on step 0, every N-th step and after anomalies; 0 turns tracing off.")] = DEFAULT_TRACE_EVERY,
    trace: Annotated[list[str] | None, typer.Option("--trace", help="Also trace this module (a path from named_modules(), e.g. encoder.layers.0); repeatable.", show_default=False)] = None,
    trace_depth: Annotated[int | None, typer.Option(help="Trace modules down to this depth instead of the leaf modules.", show_default=False)] = None,
    threshold: Annotated[list[str] | None, typer.Option("--threshold", help="Override a flag threshold, NAME=VALUE (see README); repeatable. Also read from [tool.mpaudit.thresholds] in pyproject.toml.", show_default=False)] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Measure speed and memory per arm after training (interleaved, fresh models, no tracing).")] = True,
    bench_seconds: Annotated[float, typer.Option(help="Time budget of the speed measurement; it stops earlier once every arm's IQR is under 5% of its median.")] = DEFAULT_BENCH_SECONDS,
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile'd arms (numerics tracing stays eager).")] = False,
    memory_budget: Annotated[str | None, typer.Option(help="Report the largest batch per arm that fits this memory, e.g. 16GiB.", show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Train each recommendation (fp32 keep-list, loss scale) as an extra arm and report whether it passes.")] = False,
    verify_budget: Annotated[int, typer.Option(help="At most this many extra training runs for --verify.")] = DEFAULT_VERIFY_BUDGET,
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help="Allow TF32 matmuls in the fp32 baseline (CUDA only; off by default).")] = False,
    fp16_cpu: Annotated[str, typer.Option(help="fp16 on a CPU: emulate (tensor-core numerics at fp32 speed) or native (PyTorch's slow half kernels).")] = "emulate",
    autocast_policy: Annotated[str, typer.Option(help="On a CPU, run each op in the dtype cuda autocast gives it (default: the audit predicts GPU training) or as cpu autocast does (for training on CPUs).")] = "cuda",
    plotlyjs: Annotated[str, typer.Option(help="inline (self-contained, works offline) or cdn (small file).")] = "inline",
    min_severity: Annotated[str, typer.Option(help="The least severe flags summary.md lists: error, warning or info (the rest are counted).")] = "warning",
    junit: Annotated[Path | None, typer.Option(help="Also write each gate check as a JUnit test case to this XML file.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the audit whose partial report.json is in --out: keep its finished arms (same task file, options and initial weights) and run only the rest.")] = False,
    nproc: Annotated[int | None, typer.Option(help="Run on this many processes of this machine: launches torchrun --standalone --nproc-per-node N for you (one per GPU; gloo processes on a CPU).", show_default=False)] = None,
    parallel: Annotated[str, typer.Option(help="Under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard); auto is ddp with several processes.")] = "auto",
    dist_timeout: Annotated[float, typer.Option(help="Seconds a collective may wait for a rank that neither answers nor fails, before the job stops.")] = DEFAULT_DIST_TIMEOUT_S,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display and no summary, only errors and gate failures.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Train the task once per arm from identical weights on identical batches; write report.json and report.html.

    Several processes: torchrun --nproc-per-node N -m mpaudit run model.py (or --nproc N); only rank 0 writes.
    """
    from mpaudit.ci.gaps import parse_metric_directions
    from mpaudit.ci.gate import parse_max_drop
    from mpaudit.report import write_report
    from mpaudit.run.audit import AuditConfig, audit
    from mpaudit.run.distributed import Parallel
    from mpaudit.run.env import resolve_device
    from mpaudit.run.interrupt import Interrupted, interruptible, shielded
    from mpaudit.run.progress import RichProgress, progress_enabled
    from mpaudit.run.settings import parse_thresholds, pyproject_thresholds
    from mpaudit.run.task import load_task

    if plotlyjs not in ("inline", "cdn"):
        raise UsageError(f"--plotlyjs must be inline or cdn, not {plotlyjs!r}.")
    if min_severity not in SEVERITIES:
        raise UsageError(f"--min-severity must be one of {', '.join(SEVERITIES)}, not {min_severity!r}.")
    config = AuditConfig(
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
        steps=steps, epochs=epochs, seed=seed, device=device, tf32=tf32, fp16_cpu=fp16_cpu, autocast_policy=autocast_policy,
        max_drop=parse_max_drop(max_drop or []), max_loss_gap=max_loss_gap, seeds=seeds, noise_k=noise_k,
        metric_directions=parse_metric_directions(metric_direction or []),
        bench=bench, bench_seconds=bench_seconds, compile=compile, memory_budget=memory_budget,
        verify=verify, verify_budget=verify_budget,
        trace_every=trace_every, trace=tuple(trace or ()), trace_depth=trace_depth,
        thresholds={**pyproject_thresholds(task), **parse_thresholds(threshold or [])},
        parallel=parallel, dist_timeout=dist_timeout, clip_grad_norm=clip_grad_norm, grad_accumulation=grad_accumulation,
    ).validated()
    loaded = load_task(task)
    if nproc is not None:  # options and task file checked once here, then every rank runs this command
        from mpaudit.run.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    target = out_dir or Path("reports") / loaded.name
    command = ["mpaudit", *sys.argv[1:]]
    job = Parallel.from_env(config.parallel, config.dist_timeout, resolve_device(config.device).type)
    if job.active:
        command = [*job.launcher_command(), "-m", "mpaudit", *sys.argv[1:]]
    job.on_sigterm()
    quiet = quiet or not job.is_main  # other ranks print nothing but errors
    saved = _resumable(target) if resume else None

    def keep(partial: Any) -> None:  # on disk as the audit goes
        write_report(partial, target, plotlyjs=plotlyjs, min_severity=min_severity)

    # in one process Ctrl-C and SIGTERM keep the finished arms; under torchrun SIGTERM means a rank failed
    guard = interruptible() if not job.active else contextlib.nullcontext()
    try:
        with guard:
            if progress_enabled(quiet):
                with RichProgress() as progress:
                    result = audit(loaded, config, progress=progress, command=command, parallel=job,
                                   on_update=keep, resume=saved)
            else:
                result = audit(loaded, config, command=command, parallel=job, on_update=keep, resume=saved)
    except Interrupted as stop:
        with shielded():  # a second Ctrl-C while writing changes nothing: the writes are atomic anyway
            if stop.result is not None:
                paths = write_report(stop.result, target, plotlyjs=plotlyjs, min_severity=min_severity)
                err.print(f"interrupted: the audit so far is in {paths['json']} (complete: false); run the same "
                          "command with --resume to continue it.", markup=False)
        raise typer.Exit(stop.exit_code) from None
    job.ignore_sigterm()  # the results are in: write them even while torchrun stops the job
    failure = result.distributed.failure if result.distributed is not None else None
    if failure is not None:
        where = f" in {failure.arm}" if failure.arm else ""
        if not job.is_main:  # leave at once: this breaks the collectives the other ranks wait in
            if failure.rank == job.rank:
                err.print(f"error: rank {job.rank} failed{where}: {failure.error}", markup=False)
            job.exit_after_failure(EXIT_RANK_FAILED)
        paths = write_report(result, target, plotlyjs=plotlyjs, min_severity=min_severity)
        err.print(f"error: rank {failure.rank} failed{where}: {failure.error}; the report keeps the arms "
                  f"finished before it: {paths['json']}", markup=False)
        raise typer.Exit(EXIT_RANK_FAILED)
    if job.is_main:
        paths = write_report(result, target, plotlyjs=plotlyjs, min_severity=min_severity)
        _ci_outputs(result, junit, min_severity)
    if not quiet:
        _print_summary(result)
        out.print(f"report: {paths['html']}\nresult: {paths['json']}")
    for w in result.warnings if job.is_main else []:  # they void the comparison: shown even under --quiet
        err.print(f"[bold red]WARNING:[/bold red] {escape(w)}", markup=True)
    job.close()
    _finish_gate(result, show=job.is_main)


@app.command()
@_exits()
def report(
    result_json: Annotated[Path, typer.Argument(help="A report.json written by mpaudit run.", show_default=False)],
    out_file: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: report.html beside the JSON).", show_default=False)] = None,
    plotlyjs: Annotated[str, typer.Option(help="inline (self-contained, works offline) or cdn (small file).")] = "inline",
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Re-render report.html from a saved report.json (no training)."""
    from mpaudit.report import render_html
    from mpaudit.results.atomic import atomic_write_text

    result = _read_result(result_json)
    target = out_file or result_json.with_name("report.html")
    atomic_write_text(target, render_html(result, plotlyjs=plotlyjs))
    out.print(f"report: {target}")


@app.command()
@_exits()
def gate(
    result_json: Annotated[Path, typer.Argument(help="A report.json written by mpaudit run.", show_default=False)],
    max_drop: Annotated[list[str] | None, typer.Option("--max-drop", help="METRIC=DELTA: fail when an arm's metric is DELTA worse than fp32 (repeatable).", show_default=False)] = None,
    max_loss_gap: Annotated[float | None, typer.Option(help="Fail when an arm's final training loss exceeds fp32's by more than this.", show_default=False)] = None,
    metric_direction: Annotated[list[str] | None, typer.Option("--metric-direction", help=METRIC_DIRECTION_HELP, show_default=False)] = None,
    noise_k: Annotated[float, typer.Option(help="METRIC=auto allows a drop of this many standard deviations of fp32's seed noise.")] = DEFAULT_NOISE_K,
    junit: Annotated[Path | None, typer.Option(help="Also write each gate check as a JUnit test case to this XML file.", show_default=False)] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Re-evaluate the gate on a saved report.json without training; exit 1 when it fails, 2 when it cannot judge."""
    from dataclasses import replace

    from mpaudit.ci.gaps import directions_for, parse_metric_directions
    from mpaudit.ci.gate import check_declared_metrics, check_gated_metrics, evaluate_gate, parse_max_drop

    result = _read_result(result_json)
    limits = parse_max_drop(max_drop or [])
    declared = parse_metric_directions(metric_direction or [])
    if not limits and max_loss_gap is None:
        raise UsageError("Give at least one --max-drop or --max-loss-gap to gate on.")
    if result.observed:
        raise UsageError(f"{result_json} is an observed run (mpaudit.watch), not a matched comparison: it has no fp32 "
                         "arm trained beside it, so there is nothing to gate; gate a result of mpaudit run instead.")
    if BASELINE not in result.arms:
        raise UsageError(f"{result_json} has no fp32 arm to compare against.")
    names = list(dict.fromkeys([*(m for a in result.arms for r in result.runs(a) for m in r.metrics),
                                *result.metric_directions]))
    check_declared_metrics(declared, names)
    check_gated_metrics(limits, names, declared, result.metric_directions)
    directions = directions_for(names, declared, result.metric_directions)
    result = replace(result, metric_directions=directions,
                     gate=evaluate_gate(result.arms, limits, max_loss_gap, result.replicates, noise_k, directions))
    for check in result.gate.checks:
        out.print(("PASS " if check.passed else "FAIL ") + check.message)
    _ci_outputs(result, junit)
    _finish_gate(result)


@app.command()
@_exits()
def compare(
    base: Annotated[Path, typer.Argument(help="The baseline report.json (e.g. from main).", show_default=False)],
    new: Annotated[Path, typer.Argument(help="The report.json to judge (e.g. from a pull request).", show_default=False)],
    tolerance: Annotated[list[str] | None, typer.Option("--tolerance", help="METRIC=DELTA or METRIC=auto: how much an arm's gap to fp32 may grow (repeatable).", show_default=False)] = None,
    metric_direction: Annotated[list[str] | None, typer.Option("--metric-direction", help=METRIC_DIRECTION_HELP, show_default=False)] = None,
    speedup_tolerance: Annotated[float, typer.Option(help="Relative shrink of a benchmark speedup that counts as a regression.")] = DEFAULT_SPEEDUP_TOLERANCE,
    noise_k: Annotated[float, typer.Option(help="METRIC=auto allows growth of this many standard deviations of fp32's seed noise.")] = DEFAULT_NOISE_K,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub-flavoured Markdown (for a PR comment).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    junit: Annotated[Path | None, typer.Option(help="Also write each comparison check as a JUnit test case to this XML file.", show_default=False)] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Compare two results of the same task across commits; exit 1 when precision got worse, 2 when not comparable."""
    import json

    from mpaudit.ci import compare as cmp
    from mpaudit.ci.gaps import parse_metric_directions
    from mpaudit.ci.gate import parse_max_drop
    from mpaudit.report.compare_view import to_markdown, to_text
    from mpaudit.report.junit import junit_xml_for_comparison
    from mpaudit.results.atomic import atomic_write_text
    from mpaudit.results.io import load_result

    if markdown and as_json:
        raise UsageError("Give --markdown or --json, not both.")
    limits = parse_max_drop(tolerance or [])
    declared = parse_metric_directions(metric_direction or [])
    c = cmp.compare(load_result(base), load_result(new), limits,
                    speedup_tolerance=speedup_tolerance, noise_k=noise_k, directions=declared)
    if as_json:
        out.print(json.dumps(cmp.to_dict(c), indent=1, allow_nan=False), markup=False)
    elif markdown:
        out.print(to_markdown(c), markup=False)
    else:
        out.print(to_text(c), markup=False)
    if junit is not None:
        atomic_write_text(junit, junit_xml_for_comparison(c))
    raise typer.Exit(c.exit_code)


@app.command()
@_exits()
def suite(
    suite_dir: Annotated[Path, typer.Argument(help="A folder of workloads, each a <name>/model.py.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Where each workload's report and index.html/index.json go.")] = Path("reports/suites"),
    pattern: Annotated[str | None, typer.Option("-k", "--pattern", help="Only workloads whose name contains this (or matches this glob).", show_default=False)] = None,
    jobs: Annotated[int, typer.Option(help="Workloads audited in parallel processes.")] = 1,
    timeout: Annotated[float | None, typer.Option(help="Seconds after which a workload is stopped and marked errored.", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per arm for every workload (default: mpaudit run's).", show_default=False)] = None,
    arms: Annotated[str | None, typer.Option(help="Comma-separated arms for every workload (default: fp32,bf16,fp16).", show_default=False)] = None,
    max_drop: Annotated[list[str] | None, typer.Option("--max-drop", help="Gate every workload: METRIC=DELTA (repeatable).", show_default=False)] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Measure speed and memory in every workload.")] = True,
    run_arg: Annotated[list[str] | None, typer.Option("--run-arg", help="Any other option for each mpaudit run, e.g. --run-arg=--seeds=3 (repeatable).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip workloads whose report.json in --out is complete; continue those with a partial one (mpaudit run --resume).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Audit every workload in a folder, each in its own process; write index.html and index.json. Exit 1 if a gate failed, 2 if a workload errored."""
    from mpaudit.ci.suite import run_suite

    args: list[str] = []
    if steps is not None:
        args += ["--steps", str(steps)]
    if arms is not None:
        args += ["--arms", arms]
    for spec in max_drop or []:
        args += ["--max-drop", spec]
    if not bench:
        args.append("--no-bench")
    args += list(run_arg or [])

    def done(run: Any) -> None:
        err.print(f"{run.name}: {run.status} ({run.seconds:.0f} s){' - ' + run.error if run.error else ''}")

    result = run_suite(suite_dir, out_dir, pattern=pattern, jobs=jobs, run_args=args, timeout_s=timeout, on_done=done,
                       resume=resume)
    out.print(f"index: {result.index_html}\nindex: {result.index_json}")
    raise typer.Exit(result.exit_code)


@app.command()
@_exits()
def schema(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Print the JSON Schema of report.json (every float that can be non-finite also admits "NaN", "Infinity", "-Infinity")."""
    import json

    from mpaudit.results.model import AuditResult

    out.print(json.dumps(AuditResult.json_schema(), indent=1), markup=False)


def _resumable(out_dir: Path) -> Any:
    """The partial result ``--resume`` continues: ``report.json`` in ``--out``; UsageError when there is none."""
    from mpaudit.results.io import load_result

    path = out_dir / "report.json"
    if not path.is_file():
        raise UsageError(f"--resume: there is no {path} to continue; run without --resume (or give its --out).")
    return load_result(path)


def _read_result(path: Path) -> Any:
    from mpaudit.results.io import load_result

    return load_result(path)


def _print_summary(result: Any) -> None:
    from mpaudit.report.terminal import summary_lines, summary_table

    out.print(summary_table(result))
    for line in summary_lines(result):
        out.print(line, markup=False)
    for n in result.perf_notes:
        err.print(f"note: {n}")


def _ci_outputs(result: Any, junit: Path | None, min_severity: str = "warning") -> None:
    """The JUnit file when asked for, and summary.md appended to $GITHUB_STEP_SUMMARY when that is set."""
    from mpaudit.report.junit import junit_xml
    from mpaudit.report.markdown import append_step_summary, summary_markdown
    from mpaudit.results.atomic import atomic_write_text

    if junit is not None:
        atomic_write_text(junit, junit_xml(result))
    append_step_summary(summary_markdown(result, min_severity=min_severity))


def _finish_gate(result: Any, show: bool = True) -> None:
    """Print the gate's outcome (unless ``show`` is off: ranks other than 0) and exit 1 when it failed, 2 when the
    arms did not start alike (mismatched fingerprints: every check failed, the comparison means nothing)."""
    from mpaudit.ci.gate import MISMATCHED_FINGERPRINTS

    if not result.gate.given:
        return
    if not result.fingerprints_match:
        if show:
            err.print(f"error: every gate check failed: {MISMATCHED_FINGERPRINTS}; build_model() and train_loader() "
                      "must give every arm a fresh, identical model and the same batches under a fixed seed.",
                      markup=False)
        raise typer.Exit(EXIT_USAGE)
    if result.gate.passed:
        if show:
            out.print(f"gate passed ({len(result.gate.checks)} checks)")
        return
    for check in result.gate.failures if show else []:
        err.print(f"GATE FAILED: {check.message} (limit {check.kind} {check.metric} {check.limit:g})")
    raise typer.Exit(EXIT_GATE_FAILED)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
