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


def loss_figure(log_csv: str | Path) -> plt.Figure:
    """The training loss per step from ``train_log.csv`` (with a running mean), and the auxiliary (router) loss in a
    panel of its own below, each on the scale of what it shows (the aux loss is about 100x smaller)."""
    with Path(log_csv).open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    aux = np.array([float(r["aux_loss"]) for r in rows])
    with_aux = bool(aux.any())
    panels = dict(nrows=2, height_ratios=[2, 1], figsize=(6.5, 5.5)) if with_aux else dict(nrows=1, figsize=(6.5, 3.5))
    fig, axes = plt.subplots(**panels, ncols=1, sharex=True, squeeze=False, layout="constrained")
    ax = axes[0, 0]
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss per step")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=2, label=f"mean of {k} steps")
    ax.set(ylabel="LM loss (nats / token)", title="training loss")
    ax.legend()
    if with_aux:
        ax2 = axes[1, 0]
        ax2.plot(steps, aux, lw=1, color="tab:green", label="auxiliary loss (router balance / z-loss)")
        low, high = float(aux.min()), float(aux.max())
        pad = max(high - low, abs(high) * 0.05, 1e-12) * 0.1
        ax2.set_ylim(low - pad, high + pad)
        ax2.set(ylabel="aux loss")
        ax2.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    return fig


def plot_loss(log_csv: str | Path, path: str | Path) -> Path:
    """Write ``loss_figure`` as a PNG."""
    fig = loss_figure(log_csv)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def router_usage_figure(
    usage: Mapping[str, Mapping[str, Sequence[float]]], title: str = "", missing: Mapping[str, str] | None = None
) -> plt.Figure:
    """One heatmap: routed layers (rows, in the order given: the model's) x (task, expert) columns, coloured by how
    far the mean routing weight is from uniform routing (1 / experts): red above, blue below, white uniform, on a
    colour scale symmetric around 0 and fitted to the largest deviation. ``missing``: tasks not shown, with why
    (written under the plot)."""
    subsets = list(usage)
    if not subsets:
        raise ValueError("no router usage to plot (is the model an I-LoRA model?)")
    layers = list(usage[subsets[0]])
    experts = len(usage[subsets[0]][layers[0]])
    grid = np.array([[w for subset in subsets for w in usage[subset][layer]] for layer in layers]) - 1 / experts
    reach = max(float(np.abs(grid).max()), 1e-3)
    width = min(max(4.0, 0.28 * grid.shape[1] + 3.5), 30.0)
    height = min(max(3.0, 0.16 * len(layers) + 1.8), 40.0)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-reach, vmax=reach, interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([_short(n) for n in layers], fontsize=8)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels([str(e) for _ in subsets for e in range(experts)], fontsize=7)
    for i in range(1, len(subsets)):
        ax.axvline(i * experts - 0.5, color="black", lw=0.8)
    top = ax.secondary_xaxis("top")
    top.set_xticks([i * experts + (experts - 1) / 2 for i in range(len(subsets))])
    top.set_xticklabels(subsets, fontsize=9, rotation=45, ha="left")
    ax.set_xlabel("expert, per task")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"mean routing weight - uniform (1/{experts})")
    ax.set_title(title or "I-LoRA router usage: deviation from uniform routing per task, layer and expert")
    if missing:
        ax.set_xlabel("expert, per task\nnot shown: " + "; ".join(f"{k} {v}" for k, v in missing.items()))
    return fig


def plot_router_usage(
    usage: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "",
    missing: Mapping[str, str] | None = None,
) -> Path:
    """Write ``router_usage_figure`` as a PNG."""
    fig = router_usage_figure(usage, title, missing)
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
