"""The PEFT contract, in PEFT's own style (``tests/test_custom_models.py``): a table of cases
``(name, model kind, config class, config kwargs)`` and behaviour tests parametrized over all of it, run on the oldest
and the newest supported peft (``make test``).

Where PEFT's LoRA defines the behaviour (which modules are targeted, what stays trainable), the same model is wrapped
with ``LoraConfig`` on the same fields and the two are compared, so the tests follow the installed peft.

Quantized bases: ``tests/ilora/test_quantized.py`` runs these behaviours on its own rows by importing ``Case`` and
the ``check_*`` functions below (each takes a ``Case`` and the inputs); a model kind there is any name
``conftest.build`` knows.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

import ilora

from .conftest import build, example_input, output, targets


class Case(NamedTuple):
    name: str
    kind: str  # a model conftest.build knows
    config_cls: type
    kwargs: dict[str, Any]


BASE = {"r": 4, "lora_alpha": 8}
TEST_CASES = [
    Case("mlp target as a string (regex, full match)", "mlp", ilora.ILoraConfig, {"target_modules": "fc_mid"}),
    Case("mlp target as a list", "mlp", ilora.ILoraConfig, {"target_modules": ["fc_in", "fc_out"]}),
    Case("mlp target as a regex", "mlp", ilora.ILoraConfig, {"target_modules": r"fc_(in|mid)"}),
    Case("mlp exclude_modules", "mlp", ilora.ILoraConfig,
         {"target_modules": ["fc_in", "fc_mid", "fc_out"], "exclude_modules": ["fc_mid"]}),
    Case("llama layers_to_transform + layers_pattern", "llama", ilora.ILoraConfig,
         {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    Case("mlp modules_to_save", "mlp", ilora.ILoraConfig, {"target_modules": ["fc_in"], "modules_to_save": ["fc_out"]}),
    Case("mlp init_lora_weights=False", "mlp", ilora.ILoraConfig,
         {"target_modules": ["fc_in", "fc_mid"], "init_lora_weights": False}),
    Case("llama token soft (Crab+)", "llama", ilora.ILoraConfig, {"target_modules": ["q_proj", "up_proj"]}),
    Case("llama token top-2, one A per expert", "llama", ilora.ILoraConfig,
         {"target_modules": ["v_proj", "down_proj"], "num_experts": 4, "shared_a": False, "routing": "topk",
          "top_k": 2, "balance_loss_coef": 0.01}),
    Case("qwen2 sequence soft", "qwen2", ilora.ILoraConfig,
         {"target_modules": ["q_proj", "o_proj"], "router": "sequence"}),
    Case("llama sequence top-1, all-linear", "llama", ilora.ILoraConfig,
         {"target_modules": "all-linear", "router": "sequence", "routing": "topk", "top_k": 1}),
    Case("qwen2 task top-1", "qwen2", ilora.ILoraConfig,
         {"target_modules": ["k_proj", "up_proj"], "router": "task", "num_tasks": 3, "routing": "topk", "top_k": 1}),
    Case("mlp task soft", "mlp", ilora.ILoraConfig, {"target_modules": ["fc_in"], "router": "task", "num_tasks": 3}),
    Case("mlp one expert, rsLoRA", "mlp", ilora.ILoraConfig,
         {"target_modules": ["fc_in", "fc_out"], "num_experts": 1, "use_rslora": True}),
]  # fmt: skip
IDS = [c.name for c in TEST_CASES]
SHARED_WITH_LORA = {f.name for f in dataclasses.fields(LoraConfig)} & {
    f.name for f in dataclasses.fields(ilora.ILoraConfig)
}
OTHER_TARGETS = {"mlp": ["fc_mid"], "llama": ["k_proj", "gate_proj"], "qwen2": ["v_proj", "down_proj"]}


def config(case: Case, **extra: Any) -> Any:
    return case.config_cls(**{**BASE, **case.kwargs, **extra})


def make(case: Case, **extra: Any) -> PeftModel:
    return get_peft_model(build(case.kind), config(case, **extra))


def mergeable(case: Case) -> bool:
    return case.kwargs.get("num_experts", 3) == 1 or case.kwargs.get("router") == "task"


def routed(case: Case) -> Any:
    """The call context: one task id for task routing (as merging needs), nothing otherwise."""
    return ilora.routing_context(task_ids=1) if case.kwargs.get("router") == "task" else nullcontext()


def out(model: torch.nn.Module, case: Case) -> torch.Tensor:
    with routed(case):
        return output(model, example_input(case.kind))


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def lora_twin(case: Case, **extra: Any) -> PeftModel:
    """The same model wrapped by PEFT's LoRA on the fields the two configs share."""
    shared = {k: v for k, v in {**BASE, **case.kwargs, **extra}.items() if k in SHARED_WITH_LORA}
    return get_peft_model(build(case.kind), LoraConfig(**shared))


def non_adapter(names: set[str]) -> set[str]:
    return {n for n in names if ".ilora_" not in n and ".lora_" not in n}


def adapted(model: torch.nn.Module) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


# ----------------------------------------------------------------------------------------------------- behaviours
def check_targets_as_lora(case: Case) -> None:
    assert adapted(make(case)) == adapted(lora_twin(case)) != set()


def check_outputs_change_only_after_training(case: Case) -> None:
    base = out(build(case.kind), case)
    pm = make(case)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    fresh = out(pm, case)
    if case.kwargs.get("init_lora_weights", True):
        torch.testing.assert_close(fresh, base, rtol=0, atol=0)
    else:
        assert not torch.allclose(fresh, base)
    pm.train()
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B moves on the first step; A and the router follow once B is non-zero
        out(pm, case).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable(pm)
    assert non_adapter(changed) <= {n for n in changed if ".modules_to_save." in n}
    assert not torch.allclose(out(pm, case), base)


def check_only_adapters_are_trainable(case: Case, capsys: pytest.CaptureFixture) -> None:
    pm = make(case)
    names = trainable(pm)
    assert names and {n for n in names if ".ilora_" not in n} == non_adapter(trainable(lora_twin(case)))
    if case.kwargs.get("num_experts", 3) == 1:  # a lone expert's router can never get a gradient: frozen
        assert not any(".ilora_router." in n for n in names)
    pm.print_trainable_parameters()
    count = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert f"trainable params: {count:,}" in capsys.readouterr().out


def check_save_and_load(case: Case, path: Path) -> None:
    pm = make(case, init_lora_weights=False).eval()
    expected = out(pm, case)
    pm.save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "ILORA"
    assert "import ilora" in (path / "README.md").read_text()  # the model card says how to load it
    tensors = load_file(path / "adapter_model.safetensors")
    saved_modules = tuple(f"base_model.model.{m}." for m in case.kwargs.get("modules_to_save", []))
    assert all(".ilora_" in k or k.startswith(saved_modules) for k in tensors)  # adapters and modules_to_save only
    layer = ilora.ilora_layers(pm)[0]
    E, key = layer.ilora_config["default"].num_experts, f"base_model.model.{layer.ilora_name}"
    assert tensors[f"{key}.ilora_B"].shape == (E, BASE["r"], layer.out_features)
    for is_trainable in (False, True):
        loaded = PeftModel.from_pretrained(build(case.kind), path, is_trainable=is_trainable)
        torch.testing.assert_close(out(loaded.eval(), case), expected, rtol=0, atol=0)
        # peft 0.21's rule on every peft (0.15's LoRA leaves the modules_to_save copies of a frozen load trainable)
        assert trainable(loaded) == (trainable(pm) if is_trainable else set())


def check_add_set_disable_delete(case: Case) -> None:
    base, pm = out(build(case.kind), case), make(case, init_lora_weights=False)
    out_a = out(pm, case)
    other = ilora.ILoraConfig(r=2, num_experts=2, target_modules=OTHER_TARGETS[case.kind], init_lora_weights=False,
                              modules_to_save=case.kwargs.get("modules_to_save"))  # fmt: skip
    pm.add_adapter("other", other)
    torch.testing.assert_close(out(pm, case), out_a)
    assert not any(".other" in n for n in trainable(pm))
    pm.set_adapter("other")
    assert not torch.allclose(out(pm, case), out_a)
    assert trainable(pm) and all(".other" in n for n in trainable(pm))
    wrappers = [m for m in pm.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert all(w.active_adapters == ["other"] for w in wrappers)
    with pm.disable_adapter():
        torch.testing.assert_close(out(pm, case), base)
    pm.set_adapter("default")
    torch.testing.assert_close(out(pm, case), out_a)
    assert all(w.active_adapters == ["default"] for w in wrappers)
    pm.delete_adapter("other")
    assert not any(".other" in k for k in pm.state_dict())
    torch.testing.assert_close(out(pm, case), out_a)


def check_merge_unmerge_unload(case: Case) -> None:
    base, pm = out(build(case.kind), case), make(case, init_lora_weights=False).eval()
    before = out(pm, case)
    if not mergeable(case):  # input-dependent routing: refused by name, nothing touched
        with pytest.raises(ilora.MergeNotSupportedError, match="export_to_lora"):
            pm.merge_adapter()
        torch.testing.assert_close(out(pm, case), before, rtol=0, atol=0)
    else:
        with routed(case):
            pm.merge_adapter()
        torch.testing.assert_close(out(pm, case), before, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"unmerge"):  # a merged adapter cannot be deleted (PEFT's rule)
            pm.delete_adapter("default")
        pm.unmerge_adapter()
        torch.testing.assert_close(out(pm, case), before, atol=1e-5, rtol=1e-5)
        merged = pm.merge_and_unload(**({"task_id": 1} if case.kwargs.get("router") == "task" else {}))
        assert not ilora.ilora_layers(merged)
        torch.testing.assert_close(out(merged, case), before, atol=1e-5, rtol=1e-5)
        pm = make(case, init_lora_weights=False)
    unloaded = pm.unload()
    assert not ilora.ilora_layers(unloaded)
    torch.testing.assert_close(out(unloaded, case), base, rtol=0, atol=0)


def check_dtypes(case: Case, dtype: torch.dtype) -> None:
    model = build(case.kind).to(dtype)
    pm = get_peft_model(model, config(case, init_lora_weights=False), autocast_adapter_dtype=False)
    pm.train()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example_input(case.kind).items()}
    with routed(case):
        y = output(pm, inputs)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().pow(2).mean().backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------- the table, parametrized
@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_targets_match_peft_lora(case: Case) -> None:
    check_targets_as_lora(case)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_outputs_change_only_after_training_and_only_adapters_update(case: Case) -> None:
    check_outputs_change_only_after_training(case)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_only_adapter_parameters_are_trainable(case: Case, capsys: pytest.CaptureFixture) -> None:
    check_only_adapters_are_trainable(case, capsys)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_save_and_load_both_trainable_and_frozen(case: Case, tmp_path: Path) -> None:
    check_save_and_load(case, tmp_path)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_add_set_disable_delete_adapters(case: Case) -> None:
    check_add_set_disable_delete(case)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_merge_unmerge_unload_or_the_documented_refusal(case: Case) -> None:
    check_merge_unmerge_unload(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_half_precision_bases_train(case: Case, dtype: torch.dtype) -> None:
    check_dtypes(case, dtype)


def test_inference_mode_config_leaves_nothing_of_the_adapter_trainable() -> None:
    pm = make(TEST_CASES[IDS.index("mlp modules_to_save")], inference_mode=True)
    assert trainable(pm) == set()  # its modules_to_save copies included, on peft 0.15 as on 0.21


def adapter_params(model: torch.nn.Module, name: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if f".ilora_A.{name}" in n or f".ilora_B.{name}" in n
            or f".ilora_router.{name}." in n or f".modules_to_save.{name}." in n}  # fmt: skip


def test_adding_and_loading_adapters_keeps_the_others_trainability_as_peft_021_does(tmp_path: Path) -> None:
    # peft 0.15's own PeftModel code makes the active adapter trainable again on add_adapter / load_adapter and
    # leaves an adapter loaded with is_trainable=True frozen; ilora gives peft 0.21's behaviour on both ends.
    case = TEST_CASES[IDS.index("mlp modules_to_save")]
    make(case, init_lora_weights=False).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(build(case.kind), tmp_path)
    frozen.add_adapter("added", config(case))
    frozen.load_adapter(tmp_path, "loaded")
    assert trainable(frozen) == set()
    frozen.load_adapter(tmp_path, "to_train", is_trainable=True)
    assert trainable(frozen) == adapter_params(frozen, "to_train") != set()
    training = make(case)
    before = trainable(training)
    training.load_adapter(tmp_path, "loaded")
    training.add_adapter("added", config(case))
    assert trainable(training) == before == adapter_params(training, "default")


def test_deleting_the_active_adapter_activates_a_remaining_one_as_peft_021_does() -> None:
    # peft 0.15's PeftModel kept naming the deleted adapter active: the next forward raised KeyError.
    case = TEST_CASES[IDS.index("mlp modules_to_save")]
    pm = make(case, init_lora_weights=False)
    pm.add_adapter("other", config(case, init_lora_weights=False))
    pm.set_adapter("other")
    expected = out(pm, case)
    pm.set_adapter("default")
    pm.delete_adapter("default")
    assert pm.active_adapter == "other" and pm.active_adapters == ["other"]
    torch.testing.assert_close(out(pm, case), expected)
    assert not any(".default" in k for k in pm.state_dict())


FRESH_PROCESS = ["mlp modules_to_save", "llama token top-2, one A per expert", "qwen2 task top-1"]


def test_from_pretrained_in_a_fresh_process_reproduces_outputs(tmp_path: Path) -> None:
    expected = {}
    for i, name in enumerate(FRESH_PROCESS):
        case = TEST_CASES[IDS.index(name)]
        pm = make(case, init_lora_weights=False).eval()
        pm.save_pretrained(tmp_path / str(i))
        expected[i] = out(pm, case)
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process: exact outputs
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        import ilora
        from peft import PeftModel
        from tests.ilora.test_peft_contract import IDS, TEST_CASES, out
        from tests.ilora.conftest import build
        results = {{}}
        for i, name in enumerate({FRESH_PROCESS!r}):
            case = TEST_CASES[IDS.index(name)]
            model = PeftModel.from_pretrained(build(case.kind), {str(tmp_path)!r} + "/" + str(i)).eval()
            results[str(i)] = out(model, case)
        torch.save(results, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for i, value in expected.items():
        torch.testing.assert_close(got[str(i)], value, rtol=0, atol=0, msg=FRESH_PROCESS[i])


# ------------------------------------------------------------- routing behaviour beyond the table (tiny models)
SETTINGS = {
    "crab_soft_token": dict(num_experts=3, router="token", routing="soft"),
    "moe_topk_token": dict(num_experts=4, shared_a=False, router="token", routing="topk", top_k=2),
    "sequence_soft": dict(num_experts=3, router="sequence", routing="soft"),
    "task_topk1": dict(num_experts=3, router="task", routing="topk", top_k=1, num_tasks=3),
}


def make_setting(kind: str, setting: str, **extra) -> PeftModel:
    # Without a task_type PEFT wraps in its generic PeftModel; with task_type="CAUSAL_LM" in PeftModelForCausalLM.
    cfg = ilora.ILoraConfig(r=4, lora_alpha=8, target_modules=targets(kind), init_lora_weights=False,
                            **{**SETTINGS[setting], **extra})  # fmt: skip
    return get_peft_model(build(kind), cfg)


def run(model, kind: str, setting: str) -> torch.Tensor:
    inputs = example_input(kind)
    with ilora.routing_context(task_ids=[1] if setting.startswith("task") else None):
        return output(model, inputs)


def test_loading_as_plain_lora_fails_loudly(tmp_path) -> None:
    make_setting("mlp", "crab_soft_token").save_pretrained(tmp_path)
    # PEFT resolves the config class from peft_type: asking for LoRA yields the ILoRA config, never a silent LoRA.
    assert isinstance(LoraConfig.from_pretrained(tmp_path), ilora.ILoraConfig)
    # Without `import ilora`, PEFT refuses the checkpoint and names the method.
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "ILORA" in proc.stderr
    # Forcing a LoRA config onto the weights: PEFT reports every LoRA key as missing rather than loading silently.
    with pytest.warns(UserWarning, match="missing adapter keys"):
        PeftModel.from_pretrained(build("mlp"), tmp_path, config=LoraConfig(target_modules=targets("mlp")))


def test_checkpoint_with_mismatched_shapes_or_missing_router_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    make_setting("mlp", "crab_soft_token").save_pretrained(tmp_path / "ok")
    with pytest.raises(RuntimeError, match=r"size mismatch|shape"):
        PeftModel.from_pretrained(build("mlp"), tmp_path / "ok", config=ilora.ILoraConfig(
            r=6, target_modules=targets("mlp"), num_experts=3))  # fmt: skip
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    partial = {k: v for k, v in tensors.items() if "ilora_router" not in k}
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    save_file(partial, tmp_path / "partial" / "adapter_model.safetensors")
    with pytest.raises(KeyError, match=r"incomplete: missing .*ilora_router"):
        PeftModel.from_pretrained(build("mlp"), tmp_path / "partial")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("setting", ["crab_soft_token", "moe_topk_token"])
def test_half_precision_models_train(dtype: torch.dtype, setting: str) -> None:
    model = build("llama").to(dtype)
    cfg = ilora.ILoraConfig(r=4, target_modules=targets("llama"), init_lora_weights=False, **SETTINGS[setting])
    pm = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    out = output(pm, example_input("llama"))
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().mean().backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("setting", ["moe_topk_token", "sequence_soft"])
def test_gradient_checkpointing_gives_the_same_gradients(setting: str) -> None:
    # The recomputation in backward must route as the forward did: with the forward's attention mask (padding
    # excluded from the aux-loss statistics and from sequence pooling), not the caller's state at backward time.
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        pm = make_setting("llama", setting, balance_loss_coef=0.1)
        pm.train()
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = example_input("llama")
        loss = pm(**ids, labels=ids["input_ids"]).loss  # the balance loss included
        loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_torch_compile_forward_and_backward() -> None:
    pm = make_setting("mlp", "moe_topk_token")
    x = example_input("mlp")["x"]
    eager = pm(x)
    eager.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    compiled = torch.compile(pm.base_model.model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], msg=n)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize("setting", ["crab_soft_token", "sequence_soft", "task_topk1"])
def test_generate_with_kv_cache_matches_full_recompute(setting: str, task_type: str | None) -> None:
    pm = make_setting("qwen2", setting, task_type=task_type).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    task_ids = [0, 2] if setting.startswith("task") else None
    if task_type == "CAUSAL_LM" and task_ids:  # PeftModelForCausalLM hands generate to ILoraModel.generate
        kwargs["ilora_task_ids"] = task_ids
        task_ids = None
    with ilora.routing_context(task_ids=task_ids):  # the generic PeftModel calls transformers' generate directly
        cached = pm.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = pm.generate(input_ids=ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    if setting == "sequence_soft":
        # Uncached decoding re-pools the whole sequence each step; cached decoding keeps the prompt's routing.
        assert torch.equal(cached[:, :6], uncached[:, :6])
    else:
        assert torch.equal(cached, uncached)


def test_task_ids_as_a_forward_keyword() -> None:
    pm = make_setting("llama", "task_topk1").eval()
    inputs = example_input("llama")
    by_keyword = pm(**inputs, ilora_task_ids=torch.tensor([2, 0])).logits
    with ilora.routing_context(task_ids=[2, 0]):
        by_context = pm(**inputs).logits
    torch.testing.assert_close(by_keyword, by_context)
    other = pm(**inputs, ilora_task_ids=torch.tensor([1, 1])).logits
    mlp = make_setting("mlp", "task_topk1").eval()  # a plain PeftModel calls the base model directly: hooks see it
    x = example_input("mlp")["x"]
    with ilora.routing_context(task_ids=2):
        expected = mlp(x)
    torch.testing.assert_close(mlp(x, ilora_task_ids=2), expected)
    assert not torch.allclose(by_keyword, other)


def test_sequence_routing_ignores_padding() -> None:
    pm = make_setting("llama", "sequence_soft").eval()
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    alone = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    padded = pm(input_ids=padded_ids, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


def test_unsupported_target_module_type_is_named() -> None:
    model = build("mlp")
    model.conv = torch.nn.Conv1d(2, 2, 1)
    with pytest.raises(TypeError, match=r"conv.*Conv1d"):
        get_peft_model(model, ilora.ILoraConfig(target_modules=["conv"]))
