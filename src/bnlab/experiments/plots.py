"""The lab's plots (matplotlib, Agg backend): curves with seed bands and sweeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnlab._plot import pyplot, save_png
from bnlab.experiments.analysis import acc_curve, final_acc
from bnlab.experiments.base import RunResult
from bnlab.experiments.verdict import mean_std

COLORS = {"bn": "tab:blue", "none": "tab:red", "gn": "tab:green", "ln": "tab:purple",
          "renorm": "tab:orange", "ghost": "tab:brown", "frozen": "tab:gray"}


def save(fig: Any, path: Path) -> str:
    """Save ``fig`` atomically as PNG and return its file name."""
    save_png(fig, path, dpi=90)
    return path.name


def _band(ax: Any, runs: list[RunResult], label: str, color: str | None) -> None:
    """Mean over seeds as a line, min–max over seeds as a band (runs share eval steps;
    a run that stopped early, diverged, is padded with chance accuracy)."""
    curves = [acc_curve(r) for r in runs]
    if not curves:
        return
    steps = max((c[0] for c in curves), key=len)
    if not steps:
        return
    ys = np.full((len(curves), len(steps)), runs[0].chance)
    for i, (_, acc) in enumerate(curves):
        ys[i, : len(acc)] = acc[: len(steps)]
    ys *= 100
    ax.plot(steps, ys.mean(axis=0), label=label, color=color)
    if len(curves) > 1:
        ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), alpha=0.2, color=color)


def curves_plot(path: Path, groups: dict[str, list[RunResult]], title: str,
                ylim: tuple[float, float] | None = None,
                colors: dict[str, str] | None = None) -> str:
    """Test accuracy vs step, one line per group (mean over seeds, band = min–max)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, runs in groups.items():
        _band(ax, runs, label, (colors or {}).get(label))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def sweep_plot(path: Path, xs: Sequence[float], groups: dict[str, list[list[RunResult]]],
               xlabel: str, title: str, logx: bool = True,
               value: Callable[[RunResult], float] = final_acc,
               ylabel: str = "final test accuracy (%)", scale: float = 100.0,
               logy: bool = False) -> str:
    """A metric (default final accuracy) vs a swept value, one line per group, error bars =
    std over seeds. ``groups[label][i]`` are the runs at ``xs[i]``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # Lines that coincide (Ghost BN is BN when the batch fits in one ghost batch) must all
    # stay visible: each group gets its own marker and dash pattern, drawn over the last.
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1)))]
    for i, (label, per_x) in enumerate(groups.items()):
        pts = [(x, *mean_std(scale * value(r) for r in runs)) for x, runs in zip(xs, per_x,
                                                                                strict=True)
               if runs]
        if not pts:
            continue
        color = COLORS.get(label.split(" ")[0])
        marker, dashes = styles[i % len(styles)]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker=marker, linestyle=dashes, markerfacecolor="none", capsize=3,
                    label=label, color=color)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)
