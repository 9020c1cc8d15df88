"""Every preset is a layer shape; ilora's rows name their compute path and why Triton did not run; ``--compare``
times a record's cases again and says which stayed within noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ilora
from benchmarks import compare, grid, harness, providers, report, run
from benchmarks.providers import PRESETS, SHAPES, make_problem, skip_reason


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_a_shape_read_from_its_config(name: str) -> None:
    config = getattr(ilora.ILoraConfig, name)()
    shape = SHAPES[name]
    assert (shape.experts, shape.rank, shape.shared_a) == (config.num_experts, config.r, config.shared_a)
    assert shape.routing == ("soft" if config.routing == "soft" else "topk")
    assert shape.top_k == (config.top_k if config.routing == "topk" else None)
    assert name in grid.PRESET_GRID.shapes and name in grid.FULL.shapes


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_run_small_on_cpu_with_their_path_named(name: str) -> None:
    rows = harness.run_case(SHAPES[name], 8, 32, torch.float32, "cpu", ["fwd+bwd"], ["base", "ilora_torch"], 2,
                            min_round_s=0.001)  # fmt: skip
    (row,) = [r for r in rows if r["provider"] == "ilora_torch"]
    assert row["path"] == ("torch_soft" if SHAPES[name].top_k is None else "torch_topk")
    assert row["max_abs_err"] < 1e-4 and row["x_base_q1"] <= row["x_base"] <= row["x_base_q3"]


def test_the_triton_row_is_skipped_with_select_paths_reason(monkeypatch) -> None:
    """Where Triton runs but no kernel takes the layer (here a float64 adapter), the row says the reason the layer
    would log, from ``ilora.paths.select_path``; the table lists it."""
    monkeypatch.setattr(providers, "_triton_missing", lambda: None)
    p = make_problem(SHAPES["mixlora"], 8, 32, dtype=torch.float64)
    why = skip_reason("ilora_triton", p)
    assert why is not None and "no Triton kernel for float64" in why
    row = {"provider": "ilora_torch", "skipped": "not timed", "note": "the Triton kernels are not validated on sm_80"}
    assert report.format_table([row]).endswith("note: ilora_torch: the Triton kernels are not validated on sm_80")


def _row(provider: str, x_base: float, q1: float, q3: float, d: int = 1024) -> dict:
    return dict(shape="moe", tokens=16, d=d, dtype="float32", device="cpu", mode="fwd", provider=provider,
                x_base=x_base, x_base_q1=q1, x_base_q3=q3)  # fmt: skip


def _old(provider: str, x_base: float, iqr_fraction: float) -> dict:
    """A record row as the 2026-11-22 records keep them: time quartiles, no per-round ratio quartiles."""
    row = _row(provider, x_base, 0, 0)
    del row["x_base_q1"], row["x_base_q3"]
    return {**row, "median_s": 1.0, "q1_s": 1.0 - iqr_fraction / 2, "q3_s": 1.0 + iqr_fraction / 2}


# (today, record) -> within, noise
CASES = [
    (_row("ilora_torch", 1.70, 1.60, 1.80), _old("ilora_torch", 1.63, 0.10), True, 0.10 + 1.63 * 0.05),
    (_row("ilora_torch", 2.10, 2.00, 2.20), _old("ilora_torch", 1.63, 0.10), False, 0.10 + 1.63 * 0.05),
    (_row("ilora_torch", 1.50, 1.50, 1.50), _row("ilora_torch", 1.41, 1.30, 1.50), True, 0.10),
    (_row("ilora_torch", 1.50, 1.50, 1.50), _row("ilora_torch", 1.39, 1.30, 1.50), False, 0.10),
]


@pytest.mark.parametrize(("today", "then", "within", "noise"), CASES)
def test_compare_rows_within_noise(today: dict, then: dict, within: bool, noise: float) -> None:
    (entry,) = compare.compare_rows([today], [then])
    assert entry["within"] is within
    assert entry["noise"] == pytest.approx(noise)
    assert entry["diff"] == pytest.approx(today["x_base"] - then["x_base"])


def test_compare_leaves_out_base_skipped_and_other_cases() -> None:
    then = [_row("base", 1, 1, 1), _row("ilora_torch", 1.5, 1.4, 1.6, d=64), _row("authors_loop", 2, 2, 2)]
    today = [_row("base", 1, 1, 1), _row("ilora_torch", 1.5, 1.4, 1.6), {**_row("authors_loop", 0, 0, 0),
             "skipped": "no"}]  # fmt: skip
    assert compare.compare_rows(today, then) == []


def test_run_compare_times_the_records_cases_and_writes_the_comparison(tmp_path: Path) -> None:
    rows = harness.run_case(SHAPES["crabplus"], 8, 32, torch.float32, "cpu", ["fwd"], ["base", "ilora_torch"], 2,
                            min_round_s=0.001)  # fmt: skip
    config = dict(device="cpu", d=32, shapes=["crabplus"], tokens=[8], modes=["fwd"], providers=["ilora_torch"])
    record = tmp_path / "record.json"
    report.write_json(record, report.environment(1), config, rows)
    args = ["--compare", str(record), "--rounds", "2", "--out", str(tmp_path / "out"), "--note", "a loaded machine"]
    assert run.main(args) == 0
    (written,) = (tmp_path / "out").glob("*_compare.json")
    data = json.loads(written.read_text())
    (entry,) = data["config"]["compare"]["rows"]
    assert data["config"]["compare"]["record"] == "record.json" and data["config"]["note"] == "a loaded machine"
    assert (entry["shape"], entry["provider"], entry["x_base_record"]) == (
        "crabplus",
        "ilora_torch",
        rows[-1]["x_base"],
    )


def test_compare_refuses_a_file_that_is_not_a_layer_record(tmp_path: Path) -> None:
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps({"rows": [], "config": {"preset": "model"}}))
    with pytest.raises(ValueError, match=r"model\.json is not a layer benchmark record"):
        compare.load_record(bad)
