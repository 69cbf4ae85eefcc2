"""The ``adabelief`` command: reproduce the AdaBelief paper's claims on this machine or a cluster.

``adabelief run TASK...`` trains, ``adabelief report DIR`` rebuilds a report from a run folder,
``adabelief presets`` lists the paper settings and fair-mode search spaces, ``adabelief bench
...`` runs the step benchmark (:mod:`adabelief.experiments.bench`).  Heavy imports (the tasks,
Ray) happen only in the subcommands that need them.  Every bad input ends with one line on
stderr and exit status 2, never a traceback; the other statuses are listed in ``--help``
(:data:`EXIT_OK` ... :data:`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_CLUSTER_LOST",
    "EXIT_FAILED_RUNS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

TASK_NAMES = ("toy", "classify", "lm", "transformer", "gan")
_FAILED_SHOWN = 5
#: Exit statuses of ``adabelief run``: every planned run finished; some runs failed (each is
#: named, and kept with its reason under --out/failed/); a bad command line, input or --out, or
#: an executor that cannot start (nothing ran, nothing was created); the Ray cluster was lost
#: mid-run (finished runs kept; the same command resumes); interrupted by Ctrl-C or SIGTERM.
EXIT_OK, EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_CLUSTER_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A bad command line; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


_RUN_EPILOG = """\
tasks:
  toy          2-D functions (|x|+|y|, |x+y|+|x-y|/10, (x+y)^2+(x-y)^2/10, Beale, Rosenbrock,
               McCormick): trajectories on contour plots, steps to reach the optimum
  classify     small CNN on scikit-learn's bundled 8x8 digits: train/test accuracy curves and
               the generalization gap; with --data holding CIFAR-10's python pickles
               (data_batch_1..5, test_batch, possibly under cifar-10-batches-py/) and/or
               CIFAR-100's (train, test, meta, possibly under cifar-100-python/; 100 fine
               labels): VGG11, ResNet34, DenseNet121 on each with the paper's schedule (200
               epochs, lr x0.1 at 150, batch 128; with --quick only VGG11 on 2,048 images for 2
               epochs, a smoke test)
  lm           character-level LSTM on Python standard-library source (ships with Python):
               held-out perplexity; with --data holding Penn Treebank (ptb.train.txt,
               ptb.valid.txt, ptb.test.txt, possibly under ptb/ or penn/): the paper's 1/2/3-layer
               LSTMs (200 epochs, lr /10 at 100 and 145; with --quick a small 1-layer model)
  transformer  small Transformer language model with the paper's Transformer recipe (rectify,
               decoupled decay, eps 1e-16, inverse-square-root schedule with warm-up) on the
               characters of Python's documentation (pydoc_data, ships with Python); with --data
               holding WikiText-2 (wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens,
               possibly under wikitext-2/): words. Compared with Adam and AdamW
  gan          WGAN-GP and a standard GAN on 8 Gaussians (modes covered, high-quality fraction);
               a small DCGAN on digits scored by a Frechet distance; spread over seeds = stability.
               With --data holding CIFAR-10: the paper's WGAN, WGAN-GP (DCGAN networks) and
               SN-GAN (lr 2e-4, betas (0.5, 0.999), 5 critic steps, AdaBelief eps 1e-12; with
               --quick 10 generator steps on 256 images), scored by FID when
               inception-2015-12-05.pt (NVIDIA's StyleGAN2-ADA metrics release) is in DIR or
               in torch's hub cache (~/.cache/torch/hub/checkpoints/) and the fid extra is
               installed (pip install 'adabelief[fid]'; on CPU-only torch, torchvision must come
               from PyTorch's CPU wheel index); else by a Frechet distance on a CIFAR-10 VGG11's
               features, labelled as such, not FID. FID statistics are cached in --out/cache
  all          all five (with --data, a task whose files are not in DIR uses its bundled data)
  FILE.py:FUNCTION or package.module:FUNCTION
               your own task: a function decorated with @adabelief.experiments.user_task
               (see the README); it can be mixed with the built-in tasks

modes:
  paper        every optimizer uses its preset (see 'adabelief presets') as published
  fair         every optimizer gets the same --trials N trials, drawn quasi-randomly (scrambled
               Halton, scipy.stats.qmc) from its own search space around its preset: learning
               rate, eps, weight decay and beta1 (SGD: learning rate, momentum, weight decay).
               Each trial runs at seed 0 and is judged on validation data; the best is rerun at
               every seed and scored on test data (AlgoPerf's external tuning, DeepOBS)

executors:
  local        --jobs worker processes on this machine (default)
  ray          one Ray task per run, asking for --threads CPUs (and a GPU with --device cuda),
               on the cluster named by RAY_ADDRESS, or a Ray instance started here when it is
               unset; results come back to this process, which writes every file (pip install
               'adabelief[ray]'; --data must exist at the same path on every worker)

outputs (in --out DIR):
  runs/<key>.json   one file per finished run (the key hashes everything that decides the
                    result: task, settings, data fingerprint, optimizer, hyperparameters, seed,
                    torch threads, device): rerunning a command resumes and skips finished runs
  failed/<key>.json a run whose latest attempt failed: its settings and the reason (report.md
                    lists them; manifest.json logs each command with its outcome)
  results.json      every run: task, experiment, optimizer, hyperparameters, seed, curves,
                    metrics, wall time, executor and host
  summary.csv       mean/std per experiment, optimizer, trial and metric
  report.md         per claim, what the runs show (paired comparisons over seeds), where
                    AdaBelief loses, time to target and performance profiles, per-experiment
                    tables; plots/*.png  learning curves, trajectories, GAN samples, profiles

faults:
  A run that fails (an exception, sys.exit() or a killed worker process in your task, a Ray
  worker that dies) is named with a one-line reason; the other runs go on, and only that run is
  tried again by the next command. Ctrl-C or SIGTERM stops the command; a Ray cluster that
  stops answering for 10 s stops it too, with one line naming the runs kept and the command
  that resumes. RAY_ADDRESS naming no running head is an error within 20 s. Two commands on the
  same --out never train one run twice: the second waits for the runs the first is training.
  Finished runs are never rewritten or lost.

exit status:
  0    every planned run finished (this time or before)
  1    some runs failed (named on stderr, kept with their reasons in --out/failed/)
  2    bad command line, task, --data or --out, or the executor cannot start (nothing created)
  3    the Ray cluster was lost mid-run (finished runs kept; the same command resumes)
  130  interrupted by Ctrl-C or SIGTERM (finished runs kept; the same command resumes)

examples:
  adabelief run all --quick --out runs/quick           # about 6 minutes on 2 idle CPU cores
  adabelief run all --quick --mode fair --out runs/fair  # about 11 minutes on 2 idle CPU cores
  adabelief run classify lm --data ~/datasets --device cuda --executor ray --out runs/paper
  adabelief run toy my_task.py:my_task --quick --optimizers adabelief,adam,sgd
"""


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="adabelief",
        description=(
            "Check the AdaBelief paper's claims (fast convergence like Adam, generalization like "
            "SGD, stable GAN training) on this machine or a Ray cluster."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'adabelief COMMAND --help' for the options of each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="train and compare optimizers, then write the report",
        description="Train every optimizer on the given tasks over several seeds, store each "
        "finished run, and write results.json, summary.csv, plots and report.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_RUN_EPILOG,
    )
    run.add_argument(
        "tasks",
        nargs="+",
        metavar="TASK",
        help="toy, classify, lm, transformer, gan, all, or FILE.py:FUNCTION",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="small budgets (all five tasks in about 6 minutes on 2 idle CPU cores)",
    )
    run.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        metavar="N",
        help="seeds per optimizer and setting (default: 3 with --quick, 5 otherwise)",
    )
    run.add_argument(
        "--optimizers",
        default="adabelief,sgd,adam,adamw,radam",
        metavar="LIST",
        help="comma-separated optimizer names (default: %(default)s; also adabound, yogi and "
        "adabelief_ref when their packages are installed, and AdaBelief's variants such as "
        "adabelief_int8 or adabelief_bf16w_residual_int8, a bfloat16 model with 5 bytes per "
        "parameter; adabelief presets lists them all)",
    )
    run.add_argument(
        "--mode",
        choices=("paper", "fair"),
        default="paper",
        help="paper: presets as published; fair: the same number of quasi-random trials per "
        "optimizer from its own search space, picked on validation data (default: %(default)s)",
    )
    run.add_argument(
        "--trials",
        type=_positive_int,
        default=None,
        metavar="N",
        help="fair mode: trials per optimizer (default: 4 with --quick, 20 otherwise)",
    )
    run.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="folder with CIFAR-10 / CIFAR-100 python pickles, Penn Treebank and/or WikiText-2 "
        "text files, and optionally inception-2015-12-05.pt for FID (default: bundled datasets "
        "only); every file is validated before training",
    )
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run folder (default: runs/quick with --quick, runs/full otherwise)",
    )
    run.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where classify, lm, transformer and gan --data (the CIFAR-10 GANs and their FID) "
        "train (default: cpu); toy and the bundled gan experiments are tiny and stay on the "
        "CPU; your own task picks its device itself (with --executor ray, cuda gives each run "
        "a GPU)",
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: worker processes here; ray: one Ray task per run on the cluster named by "
        "RAY_ADDRESS, or a local Ray instance (default: %(default)s)",
    )
    run.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="local executor: parallel runs in worker processes (default: CPU cores / --threads, "
        f"{_cpus()} here with one thread; 1 with --device cuda)",
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="torch threads per run (default: %(default)s; part of each run's identity, since "
        "results depend on it; the Ray executor asks for this many CPUs per run)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    report = commands.add_parser(
        "report",
        help="rebuild results.json, summary.csv, plots and report.md from a run folder",
        description="Rebuild results.json, summary.csv, the plots and report.md from every run "
        "stored in DIR/runs (e.g. after an interrupted run, or after several commands wrote "
        "into the same folder). Run files that are not valid are named and left out.",
    )
    report.add_argument(
        "directory", type=Path, metavar="DIR", help="a folder written by 'adabelief run'"
    )
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    presets = commands.add_parser(
        "presets",
        help="list the named presets (paper settings) per task and fair mode's search spaces",
        description="List every task's named presets: schedule, quick-mode overrides, and each "
        "optimizer's hyperparameters, plus fair mode's search spaces.",
    )
    presets.add_argument("task", nargs="?", choices=(*TASK_NAMES, "user"), help="only this task")

    commands.add_parser(
        "bench",
        help="optimizer step benchmark (arguments go to adabelief.experiments.bench)",
        description="Run the optimizer step benchmark; all arguments are passed to "
        "adabelief.experiments.bench (try 'adabelief bench --help').",
        add_help=False,
    )
    return parser


def _command_run(args: argparse.Namespace, argv: list[str]) -> int:
    from adabelief.experiments.registry import UnknownOptimizerError, check_optimizer_names

    try:
        optimizers = tuple(
            check_optimizer_names(n for n in args.optimizers.split(",") if n.strip())
        )
    except UnknownOptimizerError as exc:
        raise UsageError(f"adabelief run: {exc}") from None
    if not optimizers:
        raise UsageError("adabelief run: --optimizers is empty")
    if args.trials is not None and args.mode != "fair":
        raise UsageError("adabelief run: --trials only applies to --mode fair")
    if args.jobs is not None and args.executor == "ray":
        raise UsageError(
            "adabelief run: --jobs applies to --executor local; Ray schedules every run as a "
            "task of --threads CPUs"
        )
    if args.device == "cuda" and args.executor == "local":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("adabelief run: --device cuda, but torch sees no CUDA device here")
    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"adabelief run: --data {args.data} is not a folder")
    from adabelief.experiments.data import DataNotFoundError
    from adabelief.experiments.executors import ExecutorError
    from adabelief.experiments.runner import (
        OptimizerRefusedError,
        RunOptions,
        one_line,
        run_experiments,
    )
    from adabelief.experiments.store import OutputError
    from adabelief.experiments.usertask import TaskLoadError

    seeds = args.seeds or (3 if args.quick else 5)
    jobs = args.jobs or (1 if args.device == "cuda" else max(1, _cpus() // args.threads))
    options = RunOptions(
        tasks=tuple(args.tasks),
        out=args.out or Path("runs/quick" if args.quick else "runs/full"),
        quick=args.quick,
        seeds=seeds,
        optimizers=optimizers,
        mode=args.mode,
        trials=args.trials,
        data_dir=args.data,
        device=args.device,
        executor=args.executor,
        jobs=jobs,
        threads=args.threads,
        progress=not args.no_progress,
        tiny=args.tiny,
        make_plots=not args.no_plots,
    )
    if seeds < 2:
        print(
            "note: one seed gives no paired statistics (claims will read 'not tested'); use "
            "--seeds 3 or more",
            file=sys.stderr,
        )
    command = "adabelief " + shlex.join(argv)
    try:
        summary, report = run_experiments(options, command)
    except (TaskLoadError, OptimizerRefusedError, DataNotFoundError, ExecutorError) as exc:
        raise UsageError(f"adabelief run: {exc}") from None
    except OutputError as exc:
        raise UsageError(f"adabelief run: --out {exc}") from None
    for bad in summary.bad_files:
        print(f"warning: {bad}; it was run again", file=sys.stderr)
    print(
        f"{len(summary.ran)} runs done, {summary.reused} reused from {options.out}, "
        f"{len(summary.failed)} failed"
    )
    for key, error in list(summary.failed.items())[:_FAILED_SHOWN]:
        print(f"failed: {key}: {one_line(error)}", file=sys.stderr)
    if len(summary.failed) > _FAILED_SHOWN:
        print(
            f"failed: ... and {len(summary.failed) - _FAILED_SHOWN} more "
            f"(every reason is in {options.out / 'failed'} and report.md)",
            file=sys.stderr,
        )
    if summary.cluster_lost:
        print(
            f"cluster lost: {summary.cluster_lost}; {len(summary.ran)} runs finished before "
            f"that, kept in {options.out / 'runs'} with {summary.reused} earlier ones; resume "
            f"with: {command}",
            file=sys.stderr,
        )
        return EXIT_CLUSTER_LOST
    if summary.interrupted:
        print(
            f"interrupted: finished runs are saved in {options.out}/runs; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if summary.report_kept:
        print(
            f"report: {options.out / 'report.md'} left as it was (no run of this command finished)",
            file=sys.stderr,
        )
    if report is not None:
        _print_verdicts(report)
    return EXIT_FAILED_RUNS if summary.failed else EXIT_OK


def _print_verdicts(report: Any) -> None:
    print(f"report: {report.path}")
    if report.bad_files:
        print(f"  {report.bad_files} run files are not valid runs; the report lists them")
    for row in report.verdicts:
        print(f"  {row.claim}: {row.verdict} ({row.evidence})")


def _command_report(args: argparse.Namespace) -> int:
    if not args.directory.is_dir():
        raise UsageError(f"adabelief report: {args.directory} is not a folder")
    from adabelief.experiments.report import ReportError, build_report

    try:
        report = build_report(args.directory, make_plots=not args.no_plots)
    except ReportError as exc:
        raise UsageError(f"adabelief report: {exc}") from None
    except OSError as exc:
        raise UsageError(
            f"adabelief report: cannot write in {args.directory} ({exc.strerror or exc})"
        ) from None
    print(f"{report.runs} runs read, {report.missing} planned runs missing")
    _print_verdicts(report)
    return EXIT_OK


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _format_mapping(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in mapping.items())


def _command_presets(args: argparse.Namespace) -> int:
    from adabelief.experiments.presets import PRESETS
    from adabelief.experiments.registry import (
        DEFAULT_OPTIMIZERS,
        available_optimizers,
        get_entry,
        known_optimizers,
    )
    from adabelief.experiments.search import default_trials, search_space

    available = set(available_optimizers())
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="      ")
    for preset in PRESETS.values():
        if args.task and preset.task != args.task:
            continue
        print(f"{preset.name}: {preset.description}")
        print(wrap.fill(f"source: {preset.source}"))
        if preset.settings:
            print(wrap.fill(f"settings: {_format_mapping(preset.settings)}"))
        if preset.quick:
            print(wrap.fill(f"--quick: {_format_mapping(preset.quick)}"))
        for name, hparams in preset.optimizers.items():
            flag = "" if name in available else "  (not installed)"
            print(wrap.fill(f"{name}: {_format_mapping(hparams)}{flag}"))
        print()
    example = next(
        (p for p in PRESETS.values() if p.task == args.task), PRESETS["classify/digits-cnn"]
    )
    print(
        f"fair mode: {default_trials(True)} trials per optimizer with --quick, "
        f"{default_trials(False)} otherwise (--trials N); search spaces around each preset, "
        f"e.g. for {example.name} with --quick:"
    )
    for name in ("adabelief", "adam", "sgd"):
        space = search_space(name, example.hparams(name), quick=True)
        print(f"    {name}:")
        for dimension in space.describe().split("; "):
            print(f"      {dimension}")
    print(
        f"default optimizers: {', '.join(DEFAULT_OPTIMIZERS)}; installed: {', '.join(sorted(available))}"
    )
    print("optimizers (--optimizers):")
    for name in known_optimizers():
        entry = get_entry(name)
        notes = [] if name in available else ["not installed"]
        if entry.model_dtype is not None:
            dtype = str(entry.model_dtype).removeprefix("torch.")
            notes.append(f"trains the model in {dtype}")
        suffix = f" ({'; '.join(notes)})" if notes else ""
        print(wrap.fill(f"{name}: {entry.description}{suffix}"))
    return EXIT_OK


def _command_bench(rest: list[str]) -> int:
    try:
        import adabelief.experiments.bench as benchmark
    except ModuleNotFoundError as exc:
        if exc.name in ("adabelief.experiments.bench",):
            print(
                "adabelief bench: the benchmark module (adabelief.experiments.bench) is not part "
                "of this installation",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(f"adabelief bench: cannot import the benchmark ({exc})", file=sys.stderr)
        return EXIT_USAGE
    return int(benchmark.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adabelief`` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _command_bench(arguments[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(arguments)
        if args.command == "run":
            return _command_run(args, arguments)
        if args.command == "report":
            return _command_report(args)
        if args.command == "presets":
            return _command_presets(args)
        raise UsageError(f"adabelief: unknown command {args.command!r}")
    except UsageError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. 'adabelief presets | head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED_RUNS


if __name__ == "__main__":
    sys.exit(main())
