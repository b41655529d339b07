"""The ``bnlab`` command line: argument parsing only.

Every command parses its arguments here and calls into the modules that do the work
(``bnlab.verify``, ``bnlab.train``, ``bnlab.experiments`` …), imported lazily so that
``bnlab --help`` is instant and ``bnlab verify`` never needs more than it uses.

Errors a person can fix (:class:`bnlab.errors.BnlabError`, argparse's own) print one line
to stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bnlab import __version__
from bnlab.errors import BnlabError

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


# --------------------------------------------------------------------------- verify


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the random test inputs (default: 0)"
    )


def _run_verify(args: argparse.Namespace) -> int:
    from bnlab.verify import run_verify

    return run_verify(seed=args.seed)


# --------------------------------------------------------------------------- commands

# (name, one-line help, description, add_arguments, handler). Each later issue adds its
# command here; the order is the order `bnlab --help` lists them in.
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
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_arguments(p)
        p.set_defaults(_handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args._handler
    try:
        return handler(args)
    except BnlabError as exc:
        print(f"bnlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"bnlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
