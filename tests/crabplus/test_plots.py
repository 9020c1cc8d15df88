"""The run's plots are scaled to what they show: the aux loss on its own axis, router usage coloured around uniform
routing with the layers in the model's order and readable labels."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from crabplus.plots import loss_figure, plot_loss, plot_router_usage, router_usage_figure

LAYERS = [f"base_model.model.model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]  # fmt: skip


def _log(tmp_path, steps=40):
    path = tmp_path / "train_log.csv"
    rows = ["step,epoch,loss,aux_loss,lr,tokens_per_s"]
    rows += [f"{s},0,{6 * 0.9**s + 0.1:.6f},{0.010 + 0.002 * (s % 3) / 3:.6f},1e-3,100" for s in range(1, steps + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_aux_loss_gets_its_own_axis_scaled_to_it(tmp_path):
    fig = loss_figure(_log(tmp_path))
    task, aux = fig.axes
    low, high = aux.get_ylim()
    assert 0.009 < low < 0.010 and 0.0113 < high < 0.013  # not the task loss's 0-6 range
    assert task.get_ylim()[1] > 5
    plt.close(fig)
    assert plot_loss(tmp_path / "train_log.csv", tmp_path / "loss.png").stat().st_size > 0


def test_router_usage_is_coloured_around_uniform_in_model_order(tmp_path):
    rng = np.random.default_rng(0)
    usage = {task: {layer: list(rng.dirichlet([30, 30, 30])) for layer in LAYERS} for task in ("ks", "meld")}
    usage["ks"][LAYERS[0]] = [0.5, 0.25, 0.25]
    fig = router_usage_figure(usage)
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.norm.vmin == pytest.approx(-image.norm.vmax) and image.norm(0.0) == pytest.approx(0.5)
    assert image.norm.vmax == pytest.approx(0.5 - 1 / 3)  # fitted to the largest deviation from 1/3, not 0-1
    assert image.get_array()[0, 0] == pytest.approx(0.5 - 1 / 3)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:7] == ["0.q_proj", "0.k_proj", "0.v_proj", "0.o_proj", "0.gate_proj", "0.up_proj", "0.down_proj"]
    assert min(t.get_fontsize() for t in ax.get_yticklabels() + ax.get_xticklabels()) >= 7
    plt.close(fig)
    fig = router_usage_figure(usage, missing={"mer24": "has no test split"})
    assert "not shown: mer24 has no test split" in fig.axes[0].get_xlabel()
    plt.close(fig)
    assert plot_router_usage(usage, tmp_path / "usage.png").stat().st_size > 0
