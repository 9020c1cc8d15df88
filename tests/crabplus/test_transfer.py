"""Transfer table arithmetic on a hand-computed case, and its plot."""

from __future__ import annotations

import math

import pytest
from crabplus.plots import plot_router_usage
from crabplus.transfer import positive_share, primary_metric, transfer_rows, write_transfer


def test_transfer_table_by_hand(tmp_path):
    single = {
        "lora": {"ks": {"accuracy": 0.50}, "meld": {"accuracy": 0.25}, "ave": {"ave_accuracy": 0.4, "tiou": 0.1}},
        "ilora": {"ks": {"accuracy": 0.50}, "meld": {"accuracy": 0.25}, "ave": {"ave_accuracy": 0.4, "tiou": 0.1}},
    }
    multi = {
        "lora": {"ks": {"accuracy": 0.25}, "meld": {"accuracy": 0.50}, "ave": {"ave_accuracy": 0.4, "tiou": 0.9}},
        "ilora": {"ks": {"accuracy": 0.75}, "meld": {"accuracy": 0.50}, "ave": {"ave_accuracy": 0.6, "tiou": 0.0}},
    }
    rows = transfer_rows(single, multi)
    deltas = {(r.adapter, r.task): r.delta for r in rows}
    assert deltas == pytest.approx(
        {("lora", "ks"): -0.25, ("lora", "meld"): 0.25, ("lora", "ave"): 0.0,
         ("ilora", "ks"): 0.25, ("ilora", "meld"): 0.25, ("ilora", "ave"): 0.2}
    )  # fmt: skip
    assert positive_share(rows, "lora") == pytest.approx(1 / 3)  # a tie is not positive transfer
    assert positive_share(rows, "ilora") == 1.0
    table, plot = write_transfer(rows, tmp_path)
    assert "| lora | ks | accuracy | 0.500 | 0.250 | -0.250 |" in table
    assert "| ilora | 100% |" in table and "| lora | 33% |" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "transfer.csv").read_text().count("\n") == 7


def test_primary_metric_skips_what_was_not_computed():
    assert primary_metric("s4", {"box_iou": 0.3, "label_accuracy": 1.0}) == ("box_iou", 0.3)
    assert primary_metric("avvp", {"avvp_segment_type": 0.2}) == ("avvp_segment_type", 0.2)
    name, value = primary_metric("ks", {"accuracy": float("nan")})
    assert name == "" and math.isnan(value)


def test_router_usage_plot(tmp_path):
    usage = {t: {f"model.layers.{i}.q_proj": [0.2, 0.3, 0.5] for i in range(3)} for t in ("ks", "meld")}
    path = plot_router_usage(usage, tmp_path / "usage.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
