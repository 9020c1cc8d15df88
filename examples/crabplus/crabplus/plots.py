"""PNG plots of a run: the loss curve, router usage per task / layer / expert, and multi-task transfer."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt
import numpy as np


def _short(layer: str) -> str:
    """``base_model.model.model.language_model.layers.0.self_attn.q_proj`` -> ``language_model.0.q_proj``."""
    parts = [p for p in layer.removeprefix("base_model.model.").split(".") if p not in ("model", "layers", "blocks")]
    return ".".join(p for p in parts if p not in ("self_attn", "mlp", "attn"))


def plot_loss(log_csv: str | Path, path: str | Path) -> Path:
    """Training loss (and the auxiliary loss, if any) per step from ``train_log.csv``."""
    with Path(log_csv).open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=2, label=f"mean of {k} steps")
    aux = np.array([float(r["aux_loss"]) for r in rows])
    if aux.any():
        ax.plot(steps, aux, lw=1, label="aux loss")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_router_usage(usage: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """One heatmap per task: routed layers (rows) x experts (columns), the mean routing weight on its eval samples."""
    subsets = list(usage)
    if not subsets:
        raise ValueError("no router usage to plot (is the model an I-LoRA model?)")
    layers = list(usage[subsets[0]])
    cols = min(len(subsets), 5)
    rows = -(-len(subsets) // cols)
    height = max(3.0, 0.16 * len(layers) + 1.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.2 * cols + 2.5, height * rows), squeeze=False, sharey=True, layout="constrained"
    )
    image = None
    for ax, subset in zip(axes.flat, subsets):
        grid = np.array([usage[subset][layer] for layer in layers])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(subset, fontsize=9)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([_short(n) for n in layers], fontsize=5)
    for ax in list(axes.flat)[len(subsets) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean routing weight")
    fig.suptitle(title or "I-LoRA router usage per task (rows: layers, columns: experts)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_transfer(deltas: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Grouped bars: per task, the multi-task minus single-task score of each adapter (``deltas[adapter][task]``)."""
    adapters = list(deltas)
    tasks = sorted({t for d in deltas.values() for t in d})
    width = 0.8 / max(1, len(adapters))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(tasks) + 2), 3.5))
    for i, adapter in enumerate(adapters):
        values = [deltas[adapter].get(t, np.nan) for t in tasks]
        share = np.mean([v > 0 for v in values if not np.isnan(v)]) if tasks else np.nan
        ax.bar(np.arange(len(tasks)) + (i - (len(adapters) - 1) / 2) * width, values, width,
               label=f"{adapter} (positive on {share:.0%})")  # fmt: skip
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set(ylabel="multi-task - single-task", title="transfer per task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
