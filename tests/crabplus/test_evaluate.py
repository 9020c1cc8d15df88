"""Evaluation of a tiny trained run: predictions jsonl, metric tables, router usage, SAM2 stage on request."""

from __future__ import annotations

import csv
import json

from crabplus.evaluate import evaluate, format_table
from crabplus.train import train
from test_train import SUBSETS, run_config, tiny_data  # noqa: F401  (fixture)


def test_evaluate_writes_predictions_and_tables(tiny_data, tmp_path):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=2)
    train(cfg, progress=False)
    cfg.eval.sam2 = "tiny"
    result = evaluate(cfg, progress=False)
    lines = [json.loads(x) for x in (result.out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(SUBSETS)
    assert {"subset", "ids", "prompt", "text", "parsed", "error", "reference"} <= set(lines[0])
    assert set(result.scores) == set(SUBSETS)
    assert "mask_j" in result.scores["s4"] and "plumbing" in result.notes["s4"]
    table = (result.out_dir / "metrics.md").read_text()
    assert all(f"| {s} |" in table for s in SUBSETS)
    rows = list(csv.DictReader((result.out_dir / "metrics.csv").open()))
    assert {r["subset"] for r in rows} == set(SUBSETS) and any(r["metric"] == "accuracy" for r in rows)
    assert set(result.usage) == set(SUBSETS)
    layer_usage = next(iter(result.usage["ks"].values()))
    assert len(layer_usage) == 2 and abs(sum(layer_usage) - 1) < 1e-4  # 2 experts, soft routing sums to 1
    assert (result.out_dir / "router_usage.csv").is_file()

    cfg.eval.sam2, cfg.eval.subsets = None, ["s4"]
    boxes_only = evaluate(cfg, out_dir=tmp_path / "boxes", progress=False)
    assert "mask_j" not in boxes_only.scores["s4"] and "box_iou" in boxes_only.scores["s4"]
    assert "masks skipped" in boxes_only.table


def test_table_shows_missing_values_as_dashes():
    table = format_table({"ks": {"n": 2.0, "parse_error_rate": 0.5, "accuracy": float("nan")}}, {"ks": "note"})
    assert "| action_recognition | ks | 2 | 0.500 | accuracy - | note |" in table
