"""``bnlab port check`` and ``bnlab port table``: argument parsing and the two handlers."""

from __future__ import annotations

import argparse

from bnlab._argtypes import non_negative_int
from bnlab.errors import BnlabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    check = sub.add_parser(
        "check", help="the conformance table: bnlab's conversion vs naive ones, every pair",
        description="For each framework pair, build a BN layer with random state in the "
        "source framework, convert it (bnlab; naive: momentum/eps/variance copied as "
        "numbers; defaults: arrays only), and compare the eval outputs, then the running "
        "statistics after --steps training steps on identical batches. Prints a Markdown "
        "table of relative max errors (bnlab / naive / defaults).")
    check.add_argument("--steps", type=non_negative_int, default=100,
                       help="training steps on both sides (default: 100)")
    check.add_argument("--dtypes", nargs="+", choices=("float32", "float64"),
                       default=["float32", "float64"], help="default: both")
    check.add_argument("--pairs", nargs="+", default=None, metavar="SRC-DST",
                       help="e.g. torch-keras onnx-torch (default: every pair: torch<->keras, "
                       "torch<->flax, torch<->onnx)")
    check.add_argument("--out", default=None, metavar="FILE",
                       help="also write the table to FILE (Markdown)")
    table = sub.add_parser(
        "table", help="the framework behaviour table, measured by running each framework",
        description="Measure each installed framework's batch norm (defaults, momentum "
        "direction, the variance it tracks, first step, batch of one, eval without "
        "statistics, float16, float64) and print the Markdown table, or write it.")
    table.add_argument("--out", default=None, metavar="FILE",
                       help="write the table to FILE (e.g. docs/port/behaviour.md)")


def _pairs(texts: list[str] | None) -> tuple[tuple[str, str], ...]:
    from bnlab.port._harness import PAIRS

    if texts is None:
        return PAIRS
    out = []
    for text in texts:
        src, sep, dst = text.partition("-")
        if not sep or (src, dst) not in PAIRS:
            raise BnlabError(f"unknown pair {text!r}; expected one of: "
                             f"{', '.join(f'{a}-{b}' for a, b in PAIRS)}")
        out.append((src, dst))
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    from bnlab._io import atomic_write_text
    from bnlab.port._deps import require

    for module in ("jax", "flax", "keras", "onnx", "onnxruntime"):
        require(module)  # a missing framework: one line naming the extra
    if args.action == "table":
        from bnlab.port._table import behaviour_table

        text = behaviour_table()
        if args.out:
            atomic_write_text(args.out, text)
            print(f"wrote {args.out}")
        else:
            print(text, end="")
        return 0
    import warnings

    from bnlab._progress import Progress
    from bnlab.port._harness import check_table, format_results
    from bnlab.port._state import PortWarning

    pairs = _pairs(args.pairs)
    total = len(pairs) * len(args.dtypes) * 4
    with Progress(total, "port check", unit="case") as bar, warnings.catch_warnings():
        # The table shows every inexact conversion's error; the warnings say the same.
        warnings.simplefilter("ignore", PortWarning)
        results = check_table(tuple(args.dtypes), args.steps, pairs=pairs,
                              progress=lambda: bar.update(1))
    text = (f"Relative max error after conversion (eval) and after {args.steps} training "
            "steps on identical batches (running statistics); each cell: bnlab / naive / "
            "defaults.\n\n" + format_results(results) + "\n")
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0
