"""The method study's data conflicts by construction, its statistics are right, and a tiny run is complete."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import study

SMALL = study.StudySize(symbols=8, tasks=3, pairs=3, hidden=16, heads=2, intermediate=32, batch=6, steps=2,
                        test_per_task=4, budget_rank=4)  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), symbols=st.integers(4, 40), tasks=st.integers(2, 6))
def test_tasks_share_one_half_and_conflict_on_the_other(seed: int, symbols: int, tasks: int) -> None:
    size = study.StudySize(symbols=symbols, tasks=tasks)
    if tasks > symbols - symbols // 2:
        with pytest.raises(ValueError, match=r"StudySize\.tasks"):
            study.task_maps(size, seed)
        return
    maps = study.task_maps(size, seed)
    half = symbols // 2
    assert maps.shape == (tasks, symbols)
    for row in maps:  # each task's map is a permutation that keeps the halves apart
        assert sorted(row.tolist()) == list(range(symbols))
        assert (row[:half] < half).all()
    assert (maps[:, :half] == maps[0, :half]).all(), "the shared half must be the same map in every task"
    for a, b in itertools.combinations(range(tasks), 2):  # every input of the other half: a different answer
        assert (maps[a, half:] != maps[b, half:]).all(), (a, b)


def test_batch_layout_and_labels() -> None:
    maps = study.task_maps(SMALL, 0)
    tasks = torch.tensor([0, 2, 1])
    ids, labels = study.make_batch(maps, tasks, 3, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (3, 7)
    assert (ids[:, 0] == SMALL.symbols + tasks).all(), "the task token leads each row"
    x, y = ids[:, 1::2], ids[:, 2::2]
    assert (y == maps[tasks[:, None], x]).all()
    assert (labels[:, 2::2] == y).all() and (labels[:, 0::2][:, :1] == -100).all() and (labels[:, 1::2] == -100).all()


def test_t_quantile_matches_the_tables() -> None:
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, want in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert study.t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)


def test_mean_ci_hand_checked() -> None:
    mean, half = study.mean_ci([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.3027 * 0.1 / 3**0.5, rel=1e-4)
    assert study.mean_ci([0.4]) == (0.4, 0.0)


def test_budget_is_matched() -> None:
    r_lora, budget = study.matched_rank("lora", SMALL)
    # LoRA r on q, k, v, o (16 -> 16) and gate, up (16 -> 32), down (32 -> 16): r (in + out) each
    assert (r_lora, budget) == (SMALL.budget_rank, SMALL.budget_rank * (4 * 32 + 3 * 48))
    for setting in study.SETTINGS:
        r, params = study.matched_rank(setting, SMALL)
        model = study.adapt(study.base_model(SMALL, 0), setting, r, SMALL)
        assert study._trainable(model) == params
        for other in (r - 1, r + 1):
            if other >= 1:
                p = study._trainable(study.adapt(study.base_model(SMALL, 0), setting, other, SMALL))
                assert abs(p - budget) >= abs(params - budget), (setting, r, other)


def test_tiny_study_runs_and_summarizes(tmp_path) -> None:
    results = study.run_study(SMALL, seeds=[0, 1], settings=["lora", "task"], log=False)
    summary = study.summarize(results)
    for name, s in summary.items():
        assert len(results[name]["multi"]) == 2 and len(results[name]["multi"][0]) == SMALL.tasks
        assert all(0.0 <= m <= 1.0 and h >= 0 for m, h in s["multi_per_task"] + s["single_per_task"])
        assert 0.0 <= s["share_multi_beats_single"] <= 1.0
    table = study.format_summary(summary)
    assert "| task |" in table and "share of tasks where multi-task beats single-task" in table
    study.plot_study(summary, tmp_path / "s.png", "test")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_share_counts_tasks_and_pairs_by_seed() -> None:
    runs = {"multi": [[0.9, 0.1], [0.7, 0.3]], "single": [[0.5, 0.5], [0.5, 0.5]]}
    lora = {"multi": [[0.4, 0.4], [0.3, 0.3]], "single": [[0.5, 0.5], [0.5, 0.5]]}
    results = {"x": {"rank": 1, "trainable_params": 1, **runs}, "lora": {"rank": 2, "trainable_params": 1, **lora}}
    summary = study.summarize(results)
    s = summary["x"]
    assert s["share_multi_beats_single"] == 0.5  # task 0: 0.8 > 0.5; task 1: 0.2 < 0.5
    assert s["multi_mean"][0] == pytest.approx(0.5)
    # paired by seed: 0.5 - 0.4 and 0.5 - 0.3; sd of (0.1, 0.2) is 0.0707, so the half-width is 12.706 * 0.05
    assert s["minus_lora_paired"][0] == pytest.approx(0.15)
    assert s["minus_lora_paired"][1] == pytest.approx(12.706 * 0.05, rel=1e-4)
    assert summary["lora"]["minus_lora_paired"] is None
    assert "+0.150 ± 0.635" in study.format_summary(summary)
