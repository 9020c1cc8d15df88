"""``make quickstart``: the tiny Llama learns both tasks and reports routing per task."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_FILE = Path(__file__).resolve().parents[2] / "examples" / "tiny_causal_lm.py"
_spec = importlib.util.spec_from_file_location("tiny_causal_lm", _FILE)
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def test_quickstart_learns_both_tasks_and_reports_usage_per_task(capsys):
    loss = quickstart.main(max_steps=150, target=0.05)
    printed = capsys.readouterr().out
    assert loss < 0.05 and "learned both tasks" in printed
    assert "count up:" in printed and "count down:" in printed and "largest difference" in printed


def test_usage_is_reported_per_task_and_layer_type():
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import ilora

    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(llama), ilora.ILoraConfig.crab(r=2, num_experts=3))
    usage = quickstart.per_task_usage(model, quickstart.tasks(rows=2, length=6))
    # In the model's order (attention, then MLP), as a reader follows a Llama layer; not alphabetical.
    assert list(usage) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for per_task in usage.values():
        assert set(per_task) == {"count up", "count down"}
        assert all(sum(w) == pytest.approx(1, abs=1e-5) for w in per_task.values())
