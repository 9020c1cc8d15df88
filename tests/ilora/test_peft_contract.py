"""The PEFT contract, table-driven over tiny models (an MLP, Llama, Qwen2) and routing settings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import ilora

from .conftest import build, example_input, output, targets

SETTINGS = {
    "crab_soft_token": dict(num_experts=3, router="token", routing="soft"),
    "moe_topk_token": dict(num_experts=4, shared_a=False, router="token", routing="topk", top_k=2),
    "sequence_soft": dict(num_experts=3, router="sequence", routing="soft"),
    "task_topk1": dict(num_experts=3, router="task", routing="topk", top_k=1, num_tasks=3),
}


def make(kind: str, setting: str, **extra) -> PeftModel:
    # Without a task_type PEFT wraps in its generic PeftModel; with task_type="CAUSAL_LM" in PeftModelForCausalLM.
    cfg = ilora.ILoraConfig(r=4, lora_alpha=8, target_modules=targets(kind), init_lora_weights=False,
                            **{**SETTINGS[setting], **extra})  # fmt: skip
    return get_peft_model(build(kind), cfg)


def run(model, kind: str, setting: str) -> torch.Tensor:
    inputs = example_input(kind)
    with ilora.routing_context(task_ids=[1] if setting.startswith("task") else None):
        return output(model, inputs)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_only_adapter_parameters_train(model_kind: str, setting: str, capsys) -> None:
    pm = make(model_kind, setting)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".ilora_" in n for n in trainable)
    expected = sum(p.numel() for n, p in pm.named_parameters() if ".ilora_" in n)
    pm.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
    run(pm, model_kind, setting).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad and "_B" in n)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_writes_ilora_config_and_safetensors(model_kind: str, setting: str, tmp_path) -> None:
    pm = make(model_kind, setting)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ILORA"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    E, r = SETTINGS[setting]["num_experts"], 4
    layer = next(m for m in pm.modules() if isinstance(m, ilora.ILoraLayer))
    key = f"base_model.model.{layer.ilora_name}"
    e_a = 1 if SETTINGS[setting].get("shared_a", True) else E
    assert tensors[f"{key}.ilora_A"].shape == (e_a, layer.in_features, r)
    assert tensors[f"{key}.ilora_B"].shape == (E, r, layer.out_features)
    router_shape = (3, E) if setting.startswith("task") else (E, layer.in_features)
    assert tensors[f"{key}.ilora_router.weight"].shape == router_shape
    assert all(".ilora_" in k for k in tensors)


def test_from_pretrained_in_a_fresh_process_reproduces_outputs(tmp_path) -> None:
    expected = {}
    for kind in ("mlp", "llama", "qwen2"):
        for setting in SETTINGS:
            pm = make(kind, setting).eval()
            pm.save_pretrained(tmp_path / f"{kind}-{setting}")
            expected[f"{kind}-{setting}"] = run(pm, kind, setting)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import ilora
        from peft import PeftModel
        from conftest import build, example_input, output
        results = {{}}
        for name in {list(expected)!r}:
            kind, setting = name.split("-", 1)
            model = PeftModel.from_pretrained(build(kind), {str(tmp_path)!r} + "/" + name).eval()
            with ilora.routing_context(task_ids=[1] if setting.startswith("task") else None):
                results[name] = output(model, example_input(kind))
        torch.save(results, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_loading_as_plain_lora_fails_loudly(tmp_path) -> None:
    make("mlp", "crab_soft_token").save_pretrained(tmp_path)
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

    make("mlp", "crab_soft_token").save_pretrained(tmp_path / "ok")
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


def test_several_adapters_set_disable_delete(model_kind: str) -> None:
    base_out = output(build(model_kind), example_input(model_kind))
    pm = make(model_kind, "crab_soft_token")
    out_a = run(pm, model_kind, "crab_soft_token")
    pm.add_adapter("other", ilora.ILoraConfig(r=2, num_experts=2, target_modules=targets(model_kind),
                                              init_lora_weights=False))  # fmt: skip
    pm.set_adapter("other")
    out_b = run(pm, model_kind, "crab_soft_token")
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad == (".other" in n) for n, p in pm.named_parameters() if ".ilora_" in n)
    with pm.disable_adapter():
        torch.testing.assert_close(run(pm, model_kind, "x"), base_out)
    pm.set_adapter("default")
    torch.testing.assert_close(run(pm, model_kind, "crab_soft_token"), out_a)
    pm.delete_adapter("other")
    assert not any(".other" in n for n, _ in pm.named_parameters())
    torch.testing.assert_close(run(pm, model_kind, "crab_soft_token"), out_a)


@pytest.mark.parametrize(("setting", "extra"), [("crab_soft_token", {"num_experts": 1}), ("task_topk1", {}),
                                               ("moe_topk_token", {"router": "task", "num_tasks": 3})])  # fmt: skip
def test_merge_is_exact_for_one_expert_and_for_a_fixed_task(model_kind: str, setting: str, extra: dict) -> None:
    pm = make(model_kind, setting, **extra).eval()
    inputs = example_input(model_kind)
    with ilora.routing_context(task_ids=1):
        expected = output(pm, inputs)
    merged = pm.merge_and_unload(task_id=1)
    assert not any(isinstance(m, ilora.ILoraLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting", ["crab_soft_token", "sequence_soft"])
def test_merge_of_input_dependent_routing_is_refused_and_leaves_the_model_intact(setting: str) -> None:
    pm = make("llama", setting).eval()
    before = run(pm, "llama", setting)
    with pytest.raises(ilora.MergeNotSupportedError, match="export_to_lora"):
        pm.merge_and_unload()
    with pytest.raises(ilora.MergeNotSupportedError):
        pm.merge_adapter()
    torch.testing.assert_close(run(pm, "llama", setting), before)


def test_merge_adapter_and_unmerge_round_trip() -> None:
    pm = make("mlp", "task_topk1").eval()
    inputs = example_input("mlp")
    before = run(pm, "mlp", "task_topk1")
    with ilora.routing_context(task_ids=1):
        pm.merge_adapter()
    with ilora.routing_context(task_ids=1):
        torch.testing.assert_close(output(pm, inputs), before, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(run(pm, "mlp", "task_topk1"), before, atol=1e-5, rtol=1e-5)


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
        pm = make("llama", setting, balance_loss_coef=0.1)
        pm.train()
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = example_input("llama")
        loss = pm(**ids, labels=ids["input_ids"]).loss + ilora.aux_loss(pm)
        loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_torch_compile_forward_and_backward() -> None:
    pm = make("mlp", "moe_topk_token")
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
    pm = make("qwen2", setting, task_type=task_type).eval()
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
    pm = make("llama", "task_topk1").eval()
    inputs = example_input("llama")
    by_keyword = pm(**inputs, ilora_task_ids=torch.tensor([2, 0])).logits
    with ilora.routing_context(task_ids=[2, 0]):
        by_context = pm(**inputs).logits
    torch.testing.assert_close(by_keyword, by_context)
    other = pm(**inputs, ilora_task_ids=torch.tensor([1, 1])).logits
    mlp = make("mlp", "task_topk1").eval()  # a plain PeftModel calls the base model directly: the hook still sees it
    x = example_input("mlp")["x"]
    with ilora.routing_context(task_ids=2):
        expected = mlp(x)
    torch.testing.assert_close(mlp(x, ilora_task_ids=2), expected)
    assert not torch.allclose(by_keyword, other)


def test_sequence_routing_ignores_padding() -> None:
    pm = make("llama", "sequence_soft").eval()
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
