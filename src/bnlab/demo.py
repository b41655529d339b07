"""``bnlab demo``: the seed CNN with and without BN, at a moderate and a high learning rate.

Four runs of :func:`bnlab.train.train` (SGD, momentum 0.9, batch 64, same seed): norm
``bn`` and ``none`` at lr 0.01 and 0.5. Prints a table (test accuracy at a few steps, steps
to reach 97 %) and writes ``DIR/demo.png`` (test accuracy vs step), ``DIR/table.md``,
``DIR/demo.json`` and each run's files under ``DIR/runs/``. To stay within about two
minutes on two CPU cores, accuracy during training is measured on the first
``eval_subset`` test images (the table says how many).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bnlab import __version__
from bnlab._io import atomic_write_json, atomic_write_text
from bnlab.errors import BnlabError

LRS = (0.01, 0.5)
NORMS = ("bn", "none")
TARGET = 0.97
MARKER = "demo.json"


def _check_out(out: Path, overwrite: bool) -> None:
    from bnlab.train import check_out_dir

    if out.is_dir() and (out / MARKER).is_file():
        return  # a previous demo: its files are replaced
    check_out_dir(out, overwrite)


def _load(dataset: str, data_dir: str | os.PathLike[str] | None, download: bool) -> Any:
    from bnlab.data import load_dataset

    if dataset != "auto":
        return load_dataset(dataset, data_dir, download=download), None
    try:
        return load_dataset("mnist", data_dir, download=download), None
    except BnlabError as exc:
        reason = str(exc).split(" (looked in")[0]  # what is missing, or what is broken
        note = (f"note: MNIST is not available ({reason}); using scikit-learn's bundled 8x8 "
                "digits instead ('bnlab train --dataset mnist' says where bnlab looked and "
                "how to supply the files)")
        return load_dataset("digits"), note


def steps_to(metrics: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluated step whose test accuracy is at least ``target``, or None."""
    for row in metrics:
        if row["test_acc"] >= target:
            return int(row["step"])
    return None


def _acc_at(metrics: list[dict[str, Any]], step: int) -> float | None:
    for row in metrics:
        if row["step"] == step:
            return float(row["test_acc"])
    return None


def format_table(runs: list[dict[str, Any]], checkpoints: list[int], test_n: int,
                 dataset: str) -> str:
    """A Markdown table: one row per run, accuracy at ``checkpoints``, steps to 97 %."""
    head = (["lr", "norm"] + [f"acc @ {s}" for s in checkpoints]
            + ["steps to 97 %", "diverged", "time"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [f"{r['lr']:g}", "BN" if r["norm"] == "bn" else "no BN"]
        for s in checkpoints:
            acc = _acc_at(r["metrics"], s)
            cells.append("-" if acc is None else f"{100 * acc:.1f} %")
        reach = steps_to(r["metrics"], TARGET)
        cells.append("not reached" if reach is None else str(reach))
        cells.append(f"yes (step {r['diverged_at_step']})" if r["diverged"] else "no")
        cells.append(f"{r['wall_time_s']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test accuracy on the first {test_n} {dataset} test images, measured every "
                 f"{runs[0]['eval_every']} steps (so 'steps to 97 %' is a multiple of it). "
                 "seed_cnn, SGD momentum 0.9, batch 64, seed 0.")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy vs step: one panel per learning rate, BN vs no BN."""
    from bnlab._plot import pyplot, save_png

    fig, axes = pyplot().subplots(1, len(LRS), figsize=(11, 4.2), sharey=True)
    for ax, lr in zip(axes, LRS, strict=True):
        for r in runs:
            if r["lr"] != lr:
                continue
            steps = [row["step"] for row in r["metrics"]]
            accs = [100 * row["test_acc"] for row in r["metrics"]]
            label = "with BN" if r["norm"] == "bn" else "without BN"
            if r["diverged"]:
                label += f" (diverged at step {r['diverged_at_step']})"
            ax.plot(steps, accs, marker="o", markersize=3,
                    color="tab:blue" if r["norm"] == "bn" else "tab:red", label=label)
        ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1, label="97 %")
        ax.set_title(f"SGD lr = {lr:g}")
        ax.set_xlabel("training step (batch 64)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    save_png(fig, path, dpi=110)


def run_demo(
    out_dir: str | os.PathLike[str] = "bnlab-demo",
    *,
    dataset: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    steps: int | None = None,
    eval_every: int | None = None,
    eval_subset: int | None = 1000,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the four demo trainings, print the table, write the plot; return the results."""
    from bnlab.data import DATASETS
    from bnlab.train import TrainConfig, train

    t0 = time.perf_counter()
    if dataset != "auto" and dataset not in DATASETS:
        raise BnlabError(f"unknown dataset {dataset!r}; expected auto or one of: "
                         f"{', '.join(DATASETS)}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    data, note = _load(dataset, data_dir, download)
    if note:
        print(note, file=sys.stderr)
    small = data.in_shape[1] < 28
    steps = steps or (400 if small else 300)
    eval_every = eval_every or max(1, steps // 12)
    test_n = min(eval_subset or len(data.test), len(data.test))
    print(f"bnlab demo: seed_cnn ± BN on {data.name} ({data.source}), {steps} steps per run",
          file=sys.stderr)

    runs: list[dict[str, Any]] = []
    for lr in LRS:
        for norm in NORMS:
            config = TrainConfig(model="seed_cnn", norm=norm, dataset=data.name, steps=steps,
                                 batch_size=64, optimizer="sgd", lr=lr, momentum=0.9,
                                 eval_every=eval_every, eval_subset=test_n, seed=0,
                                 threads=threads)
            result = train(config, out / "runs" / f"{norm}-lr{lr:g}", progress=progress,
                           overwrite=True, data=data)
            s = result.summary
            runs.append({"lr": lr, "norm": norm, "metrics": result.metrics,
                         "diverged": s["diverged"], "diverged_at_step": s["diverged_at_step"],
                         "final_test_acc": s["test_acc"], "wall_time_s": s["wall_time_s"],
                         "eval_every": eval_every,
                         "steps_to_97": steps_to(result.metrics, TARGET)})
    checkpoints = sorted({min(steps, max(eval_every, round(f * steps / eval_every) * eval_every))
                          for f in (0.1, 0.25, 0.5)} | {steps})
    table = format_table(runs, checkpoints, test_n, data.name)
    title = (f"seed_cnn on {data.name}: test accuracy (first {test_n} test images) vs step, "
             "with and without BN")
    plot(runs, out / "demo.png", title)
    wall = time.perf_counter() - t0
    result_doc = {
        "dataset": data.name, "dataset_source": data.source, "note": note, "steps": steps,
        "eval_every": eval_every, "test_n": test_n, "wall_time_s": wall,
        "bnlab_version": __version__, "runs": runs,
    }
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_json(out / MARKER, result_doc)
    print(table)
    if note:
        print(note)
    print(f"\nplot: {out / 'demo.png'}   table: {out / 'table.md'}   runs: {out / 'runs'}")
    print(f"demo wall time: {wall:.0f} s")
    return result_doc
