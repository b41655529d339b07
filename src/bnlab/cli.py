"""The ``bnlab`` command line: argument parsing only.

Every command parses its arguments here and calls into the modules that do the work
(``bnlab.verify``, ``bnlab.train``, ``bnlab.experiments`` …), imported lazily so that
``bnlab --help`` is instant and ``bnlab verify`` never needs more than it uses.

One error path for every command (:func:`main`): errors a person can fix
(:class:`bnlab.errors.BnlabError`, argparse's own, an ``OSError`` at a path they gave) print
one line to stderr and exit with code 2, without a traceback. Ctrl-C (SIGINT) and SIGTERM
print "interrupted" after the same cleanup (``finally`` blocks, temp files removed) and exit
130 and 143; a closed stdout (``bnlab … | head -1``) ends quietly with 141.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import NoReturn

from bnlab import __version__
from bnlab._argtypes import non_negative_int, positive_int
from bnlab.errors import DISK_FULL, BnlabError, describe_os_error

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- verify


MAX_THREADS = 256
"""More threads than this is no measurement (and thousands crash the thread pools)."""


def _thread_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {value}")
    return value


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=non_negative_int, default=0,
        help="seed for the random test inputs (default: 0)"
    )


def _run_verify(args: argparse.Namespace) -> int:
    from bnlab.verify import run_verify

    return run_verify(seed=args.seed)


# --------------------------------------------------------------------------- bench


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_thread_count, nargs="+", default=None,
                   help="thread counts to measure, both sides pinned to each "
                   "(default: 1 and all cores)")
    p.add_argument("--reps", type=positive_int, default=20,
                   help="timed repetitions per measurement (the median is reported)")
    p.add_argument("--quick", action="store_true", help="measure the first shape only")


def _run_bench(args: argparse.Namespace) -> int:
    from bnlab.bench import main as bench_main

    return bench_main(args.threads, args.reps, args.quick)


# --------------------------------------------------------------------------- train / eval /
# models / demo


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from bnlab.train._cli import add_data_arguments

    add_data_arguments(p)


def _add_train(p: argparse.ArgumentParser) -> None:
    from bnlab.train._cli import add_train_arguments

    add_train_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    from bnlab.train._cli import run_train

    return run_train(args)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from bnlab.train._cli import add_eval_arguments

    add_eval_arguments(p)


def _run_eval(args: argparse.Namespace) -> int:
    from bnlab.train._cli import run_eval

    return run_eval(args)


def _add_models(p: argparse.ArgumentParser) -> None:
    from bnlab.train._cli import add_models_arguments

    add_models_arguments(p)


def _run_models(args: argparse.Namespace) -> int:
    from bnlab.train._cli import run_models

    return run_models(args)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bnlab-demo", metavar="DIR",
                   help="where the table, plot and runs go")
    p.add_argument("--dataset", default="auto",
                   help="auto (MNIST if found or downloadable, else digits), mnist, "
                   "fashion-mnist or digits")
    _add_data_args(p)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="steps per run (default: 300 on 28x28 data, 400 on digits)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate every K steps (default: a tenth of the steps)")
    p.add_argument("--eval-subset", type=positive_int, default=1000, metavar="N",
                   help="evaluate on the first N test images")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out that is not a previous demo")


def _run_demo(args: argparse.Namespace) -> int:
    from bnlab.demo import run_demo

    run_demo(args.out, dataset=args.dataset, data_dir=args.data_dir,
             download=not args.no_download, steps=args.steps, eval_every=args.eval_every,
             eval_subset=args.eval_subset, threads=args.threads, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------- experiment / report


def _add_experiment(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list the experiments and the claims they test")
    run = sub.add_parser("run", help="run the named experiments",
                         formatter_class=_HelpFormatter)
    run.add_argument("names", nargs="+", metavar="NAME", help="experiments to run (see list)")
    every = sub.add_parser("all", help="run every experiment",
                           formatter_class=_HelpFormatter)
    for q in (run, every):
        q.add_argument("--profile", choices=("smoke", "quick", "full"), default="quick",
                       help="smoke: seconds (pipeline check); quick: >= 3 seeds; full: >= 5 seeds")
        q.add_argument("--jobs", type=positive_int, default=1,
                       help="runs in parallel (threads per run = cores // jobs)")
        q.add_argument("--out", default="bnlab-lab", help="results folder (resumable)")
        q.add_argument("--force", action="store_true",
                       help="discard results in --out from another version/profile/config")
        q.add_argument("--data-dir", default=None, help="folder holding mnist/, fashion-mnist/")
        q.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or digits")


def _run_experiment(args: argparse.Namespace) -> int:
    if args.action == "list":
        from bnlab.experiments.summary import listing

        print("\n".join(listing()))
        return 0
    from bnlab.experiments import experiment_names
    from bnlab.experiments.runner import run_lab

    names = args.names if args.action == "run" else experiment_names()
    run_lab(names, profile=args.profile, out=args.out, jobs=args.jobs, force=args.force,
            data_dir=args.data_dir, dataset=args.dataset)
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="the --out folder(s) of 'bnlab experiment', one per profile and dataset")
    p.add_argument("--out", default=None,
                   help="write the report (and copies of results and plots, under "
                        "OUT/<profile>-<dataset>/) here instead of DIR; needed with several DIRs")
    p.add_argument("--readme", default=None, metavar="README",
                   help="regenerate the results block (between <!-- results:begin --> and "
                        "<!-- results:end -->) of this file")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a claim is supported in one profile and not supported in "
                        "another on the same dataset")


def _run_report(args: argparse.Namespace) -> int:
    from bnlab.experiments.report import write_labs_report

    written = write_labs_report(args.dirs, args.out, args.readme)
    print(f"wrote {written.markdown} and {written.html}")
    if args.readme is not None:
        print(f"updated the results block of {args.readme}")
    for line in written.contradictions:
        print(line)
    return 1 if args.check and written.contradictions else 0


# --------------------------------------------------------------------------- recalibrate /
# fold


def _add_recalibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model.safetensors written by 'bnlab train'")
    p.add_argument("--dataset", default=None,
                   help="training split to measure on (default: the checkpoint's dataset)")
    _add_data_args(p)
    p.add_argument("--num-batches", type=positive_int, default=None,
                   help="use the first N batches (default: the whole training split)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="batch size for the statistics passes (the result does not depend on it)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write (default: CHECKPOINT with .recalibrated.safetensors)")


def _run_recalibrate(args: argparse.Namespace) -> int:
    from bnlab.toolkit import recalibrate_checkpoint

    print(recalibrate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
        download=not args.no_download, num_batches=args.num_batches,
        batch_size=args.batch_size, out=args.out,
    ))
    return 0


def _add_fold(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model.safetensors written by 'bnlab train'")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="folded model (safetensors; load with bnlab.toolkit.load_folded)")


def _run_fold(args: argparse.Namespace) -> int:
    from bnlab.toolkit import fold_checkpoint

    print(fold_checkpoint(args.checkpoint, args.out))
    return 0


# --------------------------------------------------------------------------- learn / inspect


def _add_port(p: argparse.ArgumentParser) -> None:
    from bnlab.port._cli import add_arguments

    add_arguments(p)


def _run_port(args: argparse.Namespace) -> int:
    from bnlab.port._cli import run

    return run(args)


def _add_doctor(p: argparse.ArgumentParser) -> None:
    from bnlab.doctor._cli import add_arguments

    add_arguments(p)


def _run_doctor(args: argparse.Namespace) -> int:
    from bnlab.doctor._cli import run

    return run(args)


def _add_learn(p: argparse.ArgumentParser) -> None:
    from bnlab.learn._cli import add_arguments

    add_arguments(p)


def _run_learn(args: argparse.Namespace) -> int:
    from bnlab.learn._cli import run

    return run(args)


def _add_inspect(p: argparse.ArgumentParser) -> None:
    from bnlab.inspect._cli import add_arguments

    add_arguments(p)


def _run_inspect(args: argparse.Namespace) -> int:
    from bnlab.inspect._cli import run

    return run(args)


# --------------------------------------------------------------------------- commands

# (name, one-line help, description, add_arguments, handler); the order is the order
# `bnlab --help` lists them in.
COMMANDS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Handler]] = [
    (
        "verify",
        "check the NumPy core against torch.nn.BatchNorm*",
        "Run the NumPy batch norm against torch on a table of cases (BatchNorm1d/2d/3d, "
        "every flag combination, float32/float64) plus a finite-difference gradient "
        "check, and print max |diff| per case. Exits 1 on any mismatch.",
        _add_verify,
        _run_verify,
    ),
    (
        "bench",
        "time the NumPy core against torch's CPU batch norm",
        "Forward+backward (training) and forward (eval) of the NumPy core and of torch at "
        "the same thread count, median of --reps timings after warm-up, for the benchmark "
        "shapes; prints ms, the ratio, effective GB/s, % of a copy's bandwidth "
        "measured in the same run, and tracemalloc's peak extra memory.",
        _add_bench,
        _run_bench,
    ),
    (
        "demo",
        "the seed CNN with and without BN, at a moderate and a high learning rate",
        "Train the seed-001 CNN with and without batch norm at lr 0.01 and 0.5 (SGD, "
        "momentum 0.9, batch 64) on MNIST (or the bundled digits when MNIST is not "
        "available), print a table and write a plot of test accuracy vs step.",
        _add_demo,
        _run_demo,
    ),
    (
        "train",
        "train a model (with or without a norm) on MNIST, Fashion-MNIST or digits",
        "Train one model and write DIR/metrics.jsonl, DIR/model.safetensors and "
        "DIR/summary.json (last: its presence means the run completed). A run whose loss "
        "becomes NaN/Inf stops and records diverged: true (exit 0).",
        _add_train,
        _run_train,
    ),
    (
        "eval",
        "test accuracy of a checkpoint written by 'bnlab train' or 'bnlab fold'",
        "Rebuild the model from the checkpoint's metadata, load its weights (safetensors, "
        "never unpickled) and report test loss and accuracy.",
        _add_eval,
        _run_eval,
    ),
    (
        "models",
        "list the models with their parameter counts",
        "List every model with its options and trainable parameter count with BN and "
        "without.",
        _add_models,
        _run_models,
    ),
    (
        "experiment",
        "the claims lab: run the pre-registered experiments (list | run NAME... | all)",
        "Each claim the seed documents make about batch norm is an experiment with a "
        "verdict rule fixed before the runs. Results go to --out (resumable: a rerun skips "
        "completed runs; a killed run is redone). Prints the time per experiment at the end.",
        _add_experiment,
        _run_experiment,
    ),
    (
        "report",
        "write report.md, a self-contained report.html and verdicts.json from lab folders",
        "Each DIR is one profile on one dataset; the report puts them side by side. Per "
        "claim: the seeds' words, the verdict per profile and dataset, whether it transfers "
        "between datasets, the literature beside the lab's result, what it means in "
        "practice, the numbers, the plots (embedded in the HTML), the protocol, the rule and "
        "the time it took. Claims supported in one profile and not supported in another on "
        "the same dataset are printed, one line each (--check: exit 1 then).",
        _add_report,
        _run_report,
    ),
    (
        "recalibrate",
        "recompute a checkpoint's BN running statistics exactly on training data",
        "Load a 'bnlab train' checkpoint, replace every BN layer's running mean and "
        "variance by the exact population statistics of the training split (or its first "
        "--num-batches batches), report test accuracy before and after, and save. Layers "
        "are done in forward order, one pass each, so every layer's statistics describe "
        "its input at inference with the new statistics before it.",
        _add_recalibrate,
        _run_recalibrate,
    ),
    (
        "fold",
        "fold BN into the preceding conv/linear layers for inference",
        "Load a 'bnlab train' checkpoint, fold every BN that follows a Conv/Linear whose "
        "output feeds only it (bnlab.nn.fold_bn), check the outputs agree, and save the "
        "folded model as safetensors with the original config in its metadata.",
        _add_fold,
        _run_fold,
    ),
    (
        "port",
        "move BN state between PyTorch, Keras 3, Flax and ONNX (check | table)",
        "bnlab.port's conformance harness ('check': bnlab's conversion next to naive ones, "
        "eval and after training steps) and the framework behaviour table ('table'). Needs "
        "the port extra: pip install 'bnlab[port]'.",
        _add_port,
        _run_port,
    ),
    (
        "learn",
        "exercises: write batch norm yourself, graded against bnlab.core and torch",
        "list: the exercises; start NAME: write a template to complete; check FILE: run it "
        "(in its own process, with a timeout) on randomized cases and name the mistake when "
        "an answer is wrong. Exit 0 pass, 1 fail, 2 bad input.",
        _add_learn,
        _run_learn,
    ),
    (
        "inspect",
        "Karpathy's four diagnostic panels for a model (activations, gradients, updates)",
        "Per layer: activation statistics and histograms (saturation for tanh/sigmoid, dead "
        "units for ReLU), gradient statistics and histograms, grad:data ratio per weight, "
        "and update:data ratio over a short training run against a 1e-3 line; written as "
        "PNGs and a self-contained HTML page. Hooks only: the model is restored afterwards.",
        _add_inspect,
        _run_inspect,
    ),
    (
        "doctor",
        "find batch-norm mistakes in a checkpoint or model, measure them, say the fix",
        "Examine a 'bnlab train' checkpoint (safetensors, never unpickled) or a model given "
        "as 'package.module:factory': static checks without data; with --data, the first "
        "--num-batches training batches drive the dynamic checks and the loss/accuracy "
        "before and after recalibration are measured on the test split. Prints a table "
        "(or --json), writes --html. Exit 0 clean, 1 when a finding at or above --fail-on "
        "exists, 2 for bad input.",
        _add_doctor,
        _run_doctor,
    ),
]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once, and only where it says something (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and where to find the usage); exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnlab",
        description="bnlab: batch normalization, from the math to the cluster.",
        epilog="Run 'bnlab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, description, add_arguments, handler in COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            formatter_class=_HelpFormatter,
        )
        add_arguments(p)
        p.set_defaults(_handler=handler)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` in the block. Not in a torchrun worker: torchrun
    stops the surviving workers with SIGTERM and tells that teardown apart from a real
    failure by the signal they die of, so a worker keeps the default (die at once)."""
    if "LOCAL_RANK" in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(prog: str, text: str) -> None:
    with suppress(BrokenPipeError, ValueError):  # stderr closed too: nobody to tell
        print(f"{prog}: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args._handler
    prog = f"bnlab {args.command}"
    try:
        with _sigterm_as_interrupt():
            code = handler(args)
            sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
        return code
    except BaseException as exc:
        return _failed(prog, exc)


def _failed(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line and return the exit code; re-raise what is a bug."""
    from bnlab.distributed import record_failure

    # In a worker of `--nproc`, the launcher reports the first failure; bad input is then
    # printed once, by the launcher, instead of by every worker.
    if record_failure(exc) and isinstance(exc, BnlabError):
        return exc.exit_code
    if isinstance(exc, BnlabError):
        _say(prog, f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):
        # stdout's reader went away (`bnlab experiment list | head -1`): stop quietly, as a
        # tool killed by SIGPIPE would, and keep the interpreter's final flush from failing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + int(signal.SIGPIPE)
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in DISK_FULL):
        _say(prog, f"error: {describe_os_error(exc)}")
        return 2
    if isinstance(exc, KeyboardInterrupt):
        sigterm = isinstance(exc, _Terminated)
        _say(prog, "interrupted (SIGTERM)" if sigterm else "interrupted")
        return 128 + int(signal.SIGTERM if sigterm else signal.SIGINT)
    raise exc  # a bug (or SystemExit): its traceback, exit 1


if __name__ == "__main__":
    raise SystemExit(main())
