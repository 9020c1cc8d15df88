"""Per-module ranks, alphas and expert counts (``rank_pattern``, ``alpha_pattern``, ``num_experts_pattern``): the
same keys and semantics as PEFT's LoraConfig, validation naming the key, save/load in a fresh process, exact merge."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import ilora

from .conftest import build, example_input, output

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# Keys of every kind get_pattern_key matches: a module name, a layer regex, a full path, one that matches nothing
# targeted here but a module of the model (k_proj).
KEYS = ["q_proj", "down_proj", r"layers\.0\..*", r"model\.layers\.1\.self_attn\.v_proj", "k_proj", r".*\.mlp\..*"]


def _ilora(**kwargs) -> PeftModel:
    return get_peft_model(build("llama"), ilora.ILoraConfig(**{"r": 4, "target_modules": TARGETS, **kwargs}))


def _modules(model: PeftModel, kind: type) -> dict[str, object]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, kind)}


@settings(max_examples=12, deadline=None)
@given(
    ranks=st.dictionaries(st.sampled_from(KEYS), st.integers(1, 9), max_size=3),
    alphas=st.dictionaries(st.sampled_from(KEYS), st.sampled_from([1, 3.5, 16, 40]), max_size=3),
    rslora=st.booleans(),
)
def test_ranks_and_scalings_are_those_of_peft_lora(ranks: dict, alphas: dict, rslora: bool) -> None:
    # PEFT's LoraModel._create_and_replace is the reference: each module's rank and scaling, module by module.
    common = dict(r=4, lora_alpha=8, use_rslora=rslora, rank_pattern=ranks, alpha_pattern=alphas)
    lora = _modules(get_peft_model(build("llama"), LoraConfig(target_modules=TARGETS, **common)), LoraLayer)
    ours = _modules(_ilora(**common), ilora.ILoraLayer)
    assert set(ours) == set(lora)
    for name, layer in ours.items():
        assert layer.r["default"] == lora[name].r["default"], name
        assert layer.ilora_A["default"].shape[-1] == layer.ilora_B["default"].shape[1] == layer.r["default"]
        assert layer.scaling["default"] == pytest.approx(lora[name].scaling["default"], rel=1e-12), name


def test_patterns_combine_per_module() -> None:
    model = _ilora(lora_alpha=8, num_experts=4, routing="topk", top_k=3, rank_pattern={"down_proj": 2},
                   alpha_pattern={r"layers\.1\..*": 6}, num_experts_pattern={"q_proj": 2})  # fmt: skip
    layers = _modules(model, ilora.ILoraLayer)
    got = {name: (m.r["default"], m.scaling["default"], m.ilora_config["default"].num_experts,
                  m.ilora_config["default"].top_k) for name, m in layers.items()}  # fmt: skip
    assert got["model.layers.0.self_attn.q_proj"] == (4, 2.0, 2, 2)
    assert got["model.layers.0.mlp.down_proj"] == (2, 4.0, 4, 3)
    assert got["model.layers.1.mlp.down_proj"] == (2, 3.0, 4, 3)
    assert got["model.layers.1.self_attn.v_proj"] == (4, 1.5, 4, 3)
    assert layers["model.layers.1.self_attn.q_proj"].ilora_B["default"].shape == (2, 4, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern: key 'q_proj' gives 0"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern: key 'q_proj' gives 2\.5"),
        ({"rank_pattern": {"q_proj": True}}, r"rank_pattern: key 'q_proj' gives True"),
        ({"rank_pattern": {"q_(proj": 2}}, r"rank_pattern: key 'q_\(proj' is not a valid regex"),
        ({"rank_pattern": [("q_proj", 2)]}, r"rank_pattern: must be a dict"),
        ({"alpha_pattern": {"v_proj": -1}}, r"alpha_pattern: key 'v_proj' gives -1"),
        ({"alpha_pattern": {"v_proj": float("nan")}}, r"alpha_pattern: key 'v_proj' gives nan"),
        ({"alpha_pattern": {3: 4}}, r"alpha_pattern: keys must be module-name regexes \(str\), got 3"),
        ({"num_experts_pattern": {"up_proj": 0}}, r"num_experts_pattern: key 'up_proj' gives 0"),
    ],
)
def test_invalid_patterns_name_the_key_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{message}"):
        ilora.ILoraConfig(**kwargs)


def test_a_module_the_patterns_make_invalid_is_named() -> None:
    # top_k 3 is fine globally, capped at a pattern's smaller count; r fine globally, invalid nowhere. The module's
    # combination is validated like a config and the error names the module and what the patterns gave it.
    cfg = ilora.ILoraConfig(num_experts=4, num_expert_groups=2, localized_balance_coef=0.1,
                            rank_pattern={"q_proj": 2}, num_experts_pattern={"q_proj": 3})  # fmt: skip
    with pytest.raises(ValueError, match=r"num_expert_groups.*for module 'a\.q_proj', given r=2, num_experts=3"):
        cfg.for_module("a.q_proj")
    # With num_experts_pattern set, a module no pattern matches is checked with the global count when adapted.
    cfg = ilora.ILoraConfig(num_experts=3, num_expert_groups=2, localized_balance_coef=0.1,
                            num_experts_pattern={"q_proj": 4})  # fmt: skip
    assert cfg.for_module("a.q_proj").num_experts == 4
    with pytest.raises(ValueError, match=r"num_experts=3 is not a multiple.*for module 'a\.v_proj', which no pattern"):
        cfg.for_module("a.v_proj")


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_key_matching_no_module_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}: 1 of its 2 keys match no module.*layers\\\\.7"):
        _ilora(**{field: {"q_proj": 2, r"layers\.7\..*": 2}})


def test_an_added_adapter_with_a_bad_pattern_is_refused_before_any_module_changes() -> None:
    model = _ilora()
    before = {n: p.shape for n, p in model.named_parameters()}
    bad = ilora.ILoraConfig(r=4, target_modules=TARGETS, rank_pattern={"no_such_proj": 2})
    with pytest.raises(ValueError, match=r"rank_pattern: 1 of its 1 keys match no module"):
        model.add_adapter("second", bad)
    assert {n: p.shape for n, p in model.named_parameters()} == before


def test_merge_is_exact_per_module() -> None:
    # Task routing merges exactly: each module folds in its own rank and scaling.
    model = _ilora(router="task", num_tasks=2, num_experts=3, init_lora_weights=False, lora_alpha=8,
                   rank_pattern={"down_proj": 2, r"layers\.1\..*": 6}, alpha_pattern={"q_proj": 3})  # fmt: skip
    inputs = example_input("llama")
    with torch.no_grad(), ilora.routing_context(task_ids=1):
        want = output(model, inputs)
    merged = model.merge_and_unload(task_id=1)
    with torch.no_grad():
        torch.testing.assert_close(output(merged, inputs), want, rtol=1e-5, atol=1e-5)


def test_patterns_save_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    model = _ilora(init_lora_weights=False, num_experts=3, lora_alpha=8, use_rslora=True,
                   rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.0\..*": 5},
                   num_experts_pattern={"v_proj": 1})  # fmt: skip
    model.eval()
    with torch.no_grad():
        want = output(model, example_input("llama"))
    torch.save(want, tmp_path / "want.pt")
    model.save_pretrained(tmp_path / "adapter")
    build("llama").save_pretrained(tmp_path / "base")
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ilora
        from peft import PeftModel
        from transformers import LlamaForCausalLM
        from conftest import example_input, output
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("base"), "adapter").eval()
        cfg = model.peft_config["default"]
        assert cfg.rank_pattern == {{"down_proj": 2}} and cfg.alpha_pattern == {{r"layers\\.0\\..*": 5}}, cfg
        with torch.no_grad():
            torch.testing.assert_close(output(model, example_input("llama")), torch.load("want.pt"), rtol=0, atol=0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
