"""The model-level step: every provider wraps the same base, really trains, and the rows and table are complete."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import model_step
from benchmarks.model_providers import MODEL_PROVIDERS, ModelSize, base_model, build_model, model_skip_reason

TINY = ModelSize(hidden=32, layers=1, intermediate=64, heads=2, vocab=48, batch=4, seq=12)


@pytest.mark.parametrize("name", [n for n in MODEL_PROVIDERS if n != "frozen"])
def test_provider_starts_as_the_base_and_trains(name: str) -> None:
    if (why := model_skip_reason(name)) is not None:
        pytest.skip(why)
    base = base_model(TINY, "cpu", torch.float32)
    ids = torch.randint(TINY.vocab, (TINY.batch, TINY.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    built = build_model(name, base, TINY)
    assert built.params and built.packages, "a routed provider has trainable parameters and names its package"
    assert not any(p.requires_grad for p in base.parameters()), "the shared base must stay untouched and frozen"
    assert model_step._init_error(built, want, ids) < 1e-5
    before = [p.detach().clone() for p in built.params]
    step = model_step.make_train_step(built, ids)
    step.prepare()
    step.timed()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, built.params))
    assert changed >= len(before) // 2, f"{name}: only {changed} of {len(before)} trainable tensors moved"
    assert not any(torch.equal(a, p) for a, p in zip(before, built.params) if a.abs().sum() == 0), (
        f"{name}: a zero-initialized B did not move: the backward does not reach it"
    )


def test_rows_pair_by_round_and_list_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mixlora", None)  # an import that fails: the row says why, the run goes on
    names = ["frozen", "ilora_top2", "peft_lora_r36", "mixlora"]
    rows = model_step.run_model_step(TINY, "cpu", torch.float32, names, rounds=2)
    by = {r["provider"]: r for r in rows}
    assert by["frozen"]["x_frozen"] == 1.0 and by["frozen"]["trainable_params"] == 0
    top2 = by["ilora_top2"]
    assert top2["paired_with"] == "peft_lora_r36" and top2["x_pair"] > 0 and top2["rounds"] == 2
    assert top2["q1_s"] <= top2["median_s"] <= top2["q3_s"]
    assert "mixlora does not import" in by["mixlora"]["skipped"]
    table = model_step.format_model_table(rows)
    assert "| ilora_top2 |" in table and "skipped: mixlora: mixlora does not import" in table


def test_unknown_provider_named() -> None:
    with pytest.raises(KeyError, match="unknown model provider 'nope'"):
        model_skip_reason("nope")
