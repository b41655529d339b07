"""``bnlab learn``: argument definitions and the handler (lazy imports, argparse only)."""

from __future__ import annotations

import argparse

from bnlab._argtypes import positive_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list the exercises")
    start = sub.add_parser("start", help="write an exercise's template file to complete")
    start.add_argument("name", metavar="NAME", help="exercise (see 'bnlab learn list')")
    start.add_argument("--out", default=None, metavar="FILE",
                       help="where to write it (default: bn_NAME.py in this folder)")
    start.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    check = sub.add_parser(
        "check", help="grade a completed exercise file against bnlab.core and torch",
        description="Run FILE in a separate process (with a timeout) on randomized cases "
        "and compare what it returns with bnlab.core and torch; a wrong answer is matched "
        "against the usual mistakes and named. Exit 0: pass, 1: fail, 2: bad path.",
    )
    check.add_argument("file", metavar="FILE", help="your completed exercise file")
    check.add_argument("--exercise", default=None, metavar="NAME",
                       help="grade as this exercise (default: the file's "
                       "'# bnlab exercise: NAME' line)")
    check.add_argument("--seed", type=int, default=None,
                       help="seed for the random cases (default: a fresh one, printed)")
    check.add_argument("--timeout", type=positive_float, default=10.0,
                       help="seconds your code may run (default: 10)")


def run(args: argparse.Namespace) -> int:
    from bnlab.learn import EXERCISES, check_file, write_template

    if args.action == "list":
        width = max(len(n) for n in EXERCISES)
        for name, ex in EXERCISES.items():
            print(f"{name:<{width}}  {ex.title}\n{'':<{width}}  {ex.task}")
        return 0
    if args.action == "start":
        path = write_template(args.name, args.out, force=args.force)
        print(f"wrote {path}: complete it, then run 'bnlab learn check {path}'")
        return 0
    grade = check_file(args.file, exercise=args.exercise, seed=args.seed,
                       timeout=args.timeout)
    print(grade.format())
    return 0 if grade.passed else 1
