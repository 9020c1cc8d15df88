"""Evaluation of a tiny trained run: predictions jsonl, metric tables, router usage, SAM2 stage on request."""

from __future__ import annotations

import csv
import json

import pytest
from crabplus.evaluate import CIDER_NOTE, caption_note, evaluate, format_table
from crabplus.interface import Prediction as P
from crabplus.train import train
from test_train import SUBSETS, run_config, tiny_data  # noqa: F401  (fixture)


def test_evaluate_writes_predictions_and_tables(tiny_data, tmp_path):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=2)
    train(cfg, progress=False)
    cfg.eval.sam2 = "tiny"
    result = evaluate(cfg, progress=False)
    lines = [json.loads(x) for x in (result.out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(SUBSETS)
    assert result.out_dir == tmp_path / "eval" / "step-000002"
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
    layers = list(result.usage["ks"])  # the model's order: attention before MLP within a block, not alphabetical
    down = {n: n.replace("self_attn.q_proj", "mlp.down_proj") for n in layers if n.endswith("self_attn.q_proj")}
    pairs = [(layers.index(q), layers.index(d)) for q, d in down.items() if d in layers]
    assert pairs and all(q < down for q, down in pairs) and layers != sorted(layers)

    cfg.eval.sam2, cfg.eval.subsets = None, ["s4"]
    boxes_only = evaluate(cfg, out_dir=tmp_path / "boxes", progress=False)
    assert "mask_j" not in boxes_only.scores["s4"] and "box_iou" in boxes_only.scores["s4"]
    assert "masks skipped" in boxes_only.table


def test_table_shows_missing_values_as_dashes():
    table = format_table({"ks": {"n": 2.0, "parse_error_rate": 0.5, "accuracy": float("nan")}}, {"ks": "note"})
    assert "| action_recognition | ks | 2 | 0.500 | accuracy - | note |" in table


def test_each_evaluation_has_its_own_folder_and_is_never_overwritten_silently(tiny_data, tmp_path):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=2, save_every=1)
    train(cfg, progress=False)
    last = evaluate(cfg, progress=False)
    assert last.out_dir == tmp_path / "eval" / "step-000002"
    record = json.loads((last.out_dir / "eval.json").read_text())
    assert record["provenance"]["checkpoint"].endswith("step-000002") and record["complete"]
    assert record["provenance"]["subsets"] == SUBSETS and record["provenance"]["config"]["train"]["lr"] == 1e-2
    assert "step-000002" in (last.out_dir / "metrics.md").read_text().splitlines()[0]
    first = evaluate(cfg, tmp_path / "checkpoints" / "step-000001", progress=False)
    assert first.out_dir == tmp_path / "eval" / "step-000001"
    before = (last.out_dir / "predictions.jsonl").read_text()
    assert evaluate(cfg, progress=False).out_dir == last.out_dir  # the same evaluation again: its own results
    cfg.eval.subsets = ["ks"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate(cfg, progress=False)
    assert (last.out_dir / "predictions.jsonl").read_text() == before
    assert set(evaluate(cfg, progress=False, overwrite=True).scores) == {"ks"}
    with pytest.raises(FileExistsError, match="is a file"):
        evaluate(cfg, out_dir=last.out_dir / "metrics.md", progress=False)


def test_subsets_without_a_test_split_are_named_not_dropped(tiny_data, tmp_path):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=1)
    train(cfg, progress=False)
    cfg.eval.subsets = ["mer24"]
    with pytest.raises(ValueError, match=r"eval\.subsets: nothing to evaluate: mer24 has no test split"):
        evaluate(cfg, progress=False)
    cfg.eval.subsets = ["ks", "mer24", "unav"]
    result = evaluate(cfg, out_dir=tmp_path / "some", progress=False)
    assert set(result.not_evaluated) == {"mer24", "unav"}
    assert "| mer24 | 0 | - | not evaluated | mer24 has no test split" in result.table
    assert json.loads((tmp_path / "some" / "eval.json").read_text())["not_evaluated"].keys() == {"mer24", "unav"}


def test_table_prints_baselines_beside_accuracy_and_notes_cider():
    scores = {"ks": {"n": 4.0, "parse_error_rate": 0.0, "accuracy": 0.5, "accuracy_majority": 0.5,
                     "accuracy_chance": 0.25}}  # fmt: skip
    assert "accuracy 0.500 (majority 0.500, chance 0.250)" in format_table(scores, {})
    perfect = [P(caption="a red ball rolls left")]
    assert caption_note(perfect) == CIDER_NOTE
    assert caption_note(perfect * 3) == CIDER_NOTE  # identical references
    assert caption_note([P(caption="a red ball"), P(caption="a blue cube")]) is None
    from crabplus.metrics import score

    assert score("avcap", ["a red ball rolls left"], perfect)["cider"] == 0.0  # why the note is needed


def test_a_truncated_adapter_is_one_error_naming_the_file_and_leaves_no_evaluation(tiny_data, tmp_path):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=2, save_every=1)
    train(cfg, progress=False)
    weights = tmp_path / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError) as err:
        evaluate(cfg, progress=False)
    text = str(err.value)
    assert str(weights) in text and "--checkpoint" in text and "step-000001" in text and "\n" not in text, text
    assert not (tmp_path / "eval").exists()


def test_an_interrupted_evaluation_continues_where_it_stopped(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=1)
    train(cfg, progress=False)
    cfg.eval.batch_size = 1
    whole = evaluate(cfg, out_dir=tmp_path / "whole", progress=False)
    import crabplus.evaluate as ev

    predicted, real = [], ev.predict

    def predict_then_fail(model, processor, chunk, **kw):
        if len(predicted) == 3:
            raise RuntimeError("out of memory")  # a failure mid-way
        predicted.extend(chunk)
        return real(model, processor, chunk, **kw)

    monkeypatch.setattr(ev, "predict", predict_then_fail)
    with pytest.raises(RuntimeError):
        evaluate(cfg, progress=False)
    out = tmp_path / "eval" / "step-000001"
    record = json.loads((out / "eval.json").read_text())
    assert record["complete"] is False and "RuntimeError: out of memory" in record["failed"]
    assert not (out / "metrics.md").exists()
    with (out / "predictions.jsonl").open("a") as f:
        f.write(json.dumps({"subset": "ks", "sample": 9, "file": "gone.json", "index": 0, "text": "x"}) + "\n")
        f.write('{"subset": "ks", "te')  # a line cut short by a kill
    predicted.clear()
    monkeypatch.setattr(ev, "predict", lambda *a, **kw: predicted.extend(a[2]) or real(*a, **kw))
    again = evaluate(cfg, progress=False)
    assert len(predicted) == 2 * len(SUBSETS) - 3  # only what was not done
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
    assert again.scores == whole.scores and json.loads((out / "eval.json").read_text())["complete"] is True
