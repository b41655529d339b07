"""Speed of the NumPy core against torch's CPU kernels: ``python benchmarks/bench_core.py``.

The same benchmark as ``bnlab bench`` (see ``bnlab.bench``). Not a test: it prints ratios
against torch measured in the same run.
"""

from __future__ import annotations

import argparse

from bnlab.bench import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to measure (default: 1 and all cores)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    args = parser.parse_args()
    raise SystemExit(main(args.threads, args.reps, args.quick))
