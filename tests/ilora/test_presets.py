"""Presets of published designs: each forward (and auxiliary loss) against a reference built from the method's own
code, per-layer expert counts, and save/load in a fresh process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

import ilora

from . import conftest
from .conftest import build, example_input, output

PRESETS = ("hydralora", "mixlora", "loramoe", "mola")


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return conftest.tiny_llama(layers).eval()


def preset(name: str, **overrides) -> ilora.ILoraConfig:
    extra = {"num_layers": 4} if name == "mola" else {}
    return getattr(ilora.ILoraConfig, name)(init_lora_weights=False, lora_dropout=0.0, **extra, **overrides)


def adapted(name: str, layers: int = 2, **overrides):
    model = get_peft_model(tiny_llama(layers), preset(name, **overrides)).eval()
    for layer in ilora.ilora_layers(model):  # routers away from uniform, so routing decisions matter
        layer.ilora_router["default"].weight.data.mul_(8)
    return model


def tokens(d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, d, generator=torch.Generator().manual_seed(seed))


def parts(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    return (layer.ilora_A["default"], layer.ilora_B["default"], layer.ilora_router["default"].weight,
            layer.scaling["default"])  # fmt: skip


def test_hydralora_matches_the_authors_layer() -> None:
    """``Linear.forward`` of ``HydraLoRA/peft/tuners/lora.py`` (Clin0212/HydraLoRA): shared ``lora_A``, heads
    ``lora_B{i}``, ``softmax(lora_route(x))`` in float32, one head at a time."""
    layer = adapted("hydralora").base_model.model.model.layers[0].mlp.up_proj
    A, B, route, scaling = parts(layer)
    assert A.shape[0] == 1 and B.shape[0] == 4
    x = tokens()
    result = layer.base_layer(x)
    route_weight = torch.softmax(x @ route.T, dim=-1, dtype=torch.float32)
    for i in range(B.shape[0]):
        result = result + route_weight[:, :, i].unsqueeze(-1) * ((x @ A[0]) @ B[i]) * scaling
    torch.testing.assert_close(layer(x), result, rtol=1e-5, atol=1e-6)


def test_loramoe_matches_the_authors_layer_and_constraint() -> None:
    """``Linear.forward`` of ``peft/tuners/lora.py`` (Ablustrund/LoRAMoE): ``lora_A{i}``/``lora_B{i}`` per expert,
    dense softmax routing, and its ``blcls`` (localized balancing) term on the same routing weights."""
    model = adapted("loramoe", localized_balance_coef=0.1, localized_balance_alpha=0.1).train()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    A, B, route, scaling = parts(layer)
    assert A.shape[0] == B.shape[0] == 8
    x = tokens()
    result = layer.base_layer(x)
    route_weight = torch.softmax(x @ route.T, dim=-1, dtype=torch.float32)
    for i in range(8):
        result = result + route_weight[:, :, i].unsqueeze(-1) * ((x @ A[i]) @ B[i]) * scaling
    task_types = torch.tensor([1, 0])
    with ilora.routing_context(task_ids=task_types):
        torch.testing.assert_close(layer(x), result, rtol=1e-5, atol=1e-6)
    favoured = torch.concat(
        ((task_types.view(-1, 1) == 1).repeat(1, 4), (task_types.view(-1, 1) == 0).repeat(1, 4)), -1
    )
    v = (route_weight.sum(dim=1) * torch.where(favoured, 1.1, 0.9)).flatten()
    blcls = v.var() / (v.mean() ** 2 + 1e-10) * 0.1
    torch.testing.assert_close(ilora.aux_loss(model), blcls, rtol=1e-4, atol=1e-7)


def test_mixlora_matches_the_mixlora_package_where_the_designs_agree() -> None:
    """``MixLoraSparseMoe`` of the ``mixlora`` package (``mixlora/model.py``, LoRA experts ``LoraLinear`` from
    ``mixlora/lora_linear.py``) with experts on ``up_proj`` only, where block-level and per-linear routing are the
    same model (see ``ilora.presets.mixlora``); the balance loss against MoE-PEFT's
    ``_mixtral_load_balancing_loss_func`` (``moe_peft/adapters/mixlora/model.py``), coefficient 0.001."""
    from mixlora.config import MixLoraConfig
    from mixlora.lora_linear import LoraLinear
    from mixlora.model import MixLoraSparseMoe

    base = tiny_llama()
    plain_mlp = copy.deepcopy(base.model.layers[0].mlp)
    model = get_peft_model(base, preset("mixlora", target_modules=["up_proj"])).train()
    ours_mlp = model.base_model.model.model.layers[0].mlp
    A, B, route, scaling = parts(ours_mlp.up_proj)
    route.data.mul_(8)
    cfg = MixLoraConfig(dtype_=torch.float32, model_type_="llama", act_fn_="silu", num_experts_=8, top_k_=2,
                        jitter_noise_=0.0, lora_r_=16, lora_alpha_=32, lora_dropout_=0.05, use_dora_=False,
                        use_rslora_=False, lora_init_="original")  # fmt: skip
    moe = MixLoraSparseMoe(plain_mlp, cfg)
    moe.gate_ = route.detach().clone()
    for e in range(8):
        expert = LoraLinear(plain_mlp.up_proj, cfg, (A[e].detach().T.clone(), B[e].detach().T.clone())).eval()
        moe.experts_[f"experts.{e}.up_proj"] = expert
    assert scaling == moe.experts_["experts.0.up_proj"].scaling_
    x = tokens()
    with torch.no_grad():
        want = moe(x.clone())
    got = ours_mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    probs = torch.softmax(x.reshape(-1, 32) @ route.T, dim=-1)
    _, selected = torch.topk(probs, 2, dim=-1)
    tokens_per_expert = torch.nn.functional.one_hot(selected, 8).float().mean(0)
    mixtral = 0.001 * torch.sum(tokens_per_expert * probs.mean(0).unsqueeze(0)) * 8
    torch.testing.assert_close(ilora.aux_loss(model), mixtral, rtol=1e-5, atol=1e-8)


def mola_reference(x: torch.Tensor, layer, top_k: int = 2) -> torch.Tensor:
    """``Linear_MoE.forward`` of the authors' ``src/mola_lora_hacked.py`` (GCYZSL/MoLA; MoE-PEFT's ``MolaSparseMoe``
    in ``moe_peft/adapters/mola/model.py`` is the same): softmax, top-k, renormalised, each expert's LoRA
    ``B(A(x)) * scaling`` added to the base output, one expert at a time."""
    A, B, route, scaling = parts(layer)
    flat = x.reshape(-1, x.shape[-1])
    weights = torch.softmax(flat @ route.T, dim=1)
    weights, selected = torch.topk(weights, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    final = torch.zeros(flat.shape[0], B.shape[-1])
    for e in range(B.shape[0]):
        idx, top_x = torch.where(selected == e)
        final.index_add_(0, idx, ((flat[idx] @ A[e]) @ B[e]) * scaling * weights[idx, top_x, None])
    return layer.base_layer(x) + final.reshape(*x.shape[:-1], -1)


def test_mola_layer_wise_experts_and_forward() -> None:
    model = adapted("mola", layers=4)
    blocks = model.base_model.model.model.layers
    counts = [block.self_attn.q_proj.ilora_B["default"].shape[0] for block in blocks]
    assert counts == [2, 4, 6, 8]
    for i in (0, 3):
        layer = model.base_model.model.model.layers[i].mlp.down_proj
        x = tokens(layer.in_features, seed=i)
        torch.testing.assert_close(layer(x), mola_reference(x, layer), rtol=1e-5, atol=1e-6)


def test_mola_numbers_are_the_authors() -> None:
    """The defaults of ``train`` in the authors' ``mola_training.py`` (GCYZSL/MoLA), transcribed: ``lora_r`` 8 in
    each of the 32 layers, ``lora_alpha`` 16, ``lora_dropout`` 0.05, ``number_experts`` 2-4-6-8 by eight layers,
    ``top_k`` 2 everywhere, ``lora_target_modules`` the seven projections."""
    lora_r, lora_alpha, lora_dropout = [8] * 32, 16, 0.05
    number_experts, top_k = [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8, [2] * 32
    targets = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    cfg = ilora.ILoraConfig.mola()
    modules = [cfg.for_module(f"model.layers.{i}.mlp.up_proj") for i in range(32)]
    assert [m.r for m in modules] == lora_r
    assert {m.lora_alpha for m in modules} == {lora_alpha} and cfg.lora_dropout == lora_dropout
    assert [m.num_experts for m in modules] == number_experts and [m.top_k for m in modules] == top_k
    assert sorted(cfg.target_modules) == sorted(targets)
    assert (cfg.routing, cfg.shared_a, cfg.balance_loss_coef) == ("topk", False, 0.0)


def test_localized_balance_groups_are_checked_only_where_the_constraint_runs() -> None:
    # Off (coefficient 0), the groups are unused: any expert count constructs.
    assert ilora.ILoraConfig.loramoe(num_experts=3).num_experts == 3
    with pytest.raises(ValueError, match=r"ILoraConfig\.num_expert_groups: .*num_experts=3 is not a multiple of "
                                         r"num_expert_groups=2.*localized_balance_coef=0"):  # fmt: skip
        ilora.ILoraConfig.loramoe(num_experts=3, localized_balance_coef=0.1)
    with pytest.raises(ValueError, match=r"ILoraConfig\.localized_balance_coef: has no effect with num_experts=1"):
        ilora.ILoraConfig(num_experts=1, localized_balance_coef=0.1)
    # A one-expert (plain LoRA) module under a pattern simply has no localized loss; the others keep theirs.
    model = adapted("loramoe", localized_balance_coef=0.1, localized_balance_alpha=0.1,
                    num_experts_pattern={"gate_proj": 1}).train()  # fmt: skip
    ids = example_input("llama")
    model(**ids, ilora_task_ids=[1, 0])
    stats = {layer.ilora_name.rsplit(".", 1)[-1]: "default" in layer.aux_stats for layer in ilora.ilora_layers(model)}
    assert stats == {"gate_proj": False, "up_proj": True, "down_proj": True}
    assert ilora.aux_loss(model) > 0


def test_mixlora_attention_is_plain_lora() -> None:
    layer = adapted("mixlora").base_model.model.model.layers[0].self_attn.q_proj
    A, B, _, scaling = parts(layer)
    assert A.shape[0] == B.shape[0] == 1
    x = tokens()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ A[0]) @ B[0] * scaling, rtol=1e-5, atol=1e-6)


def test_expert_pattern_validation() -> None:
    with pytest.raises(ValueError, match=r"ILoraConfig\.num_experts_pattern"):
        ilora.ILoraConfig(num_experts_pattern={"q_proj": 0})
    cfg = ilora.ILoraConfig(num_experts=4, num_expert_groups=2, localized_balance_coef=0.1,
                            num_experts_pattern={"q_proj": 3})  # fmt: skip
    with pytest.raises(ValueError, match=r"num_expert_groups.*for module 'layers\.0\.q_proj'"):
        cfg.for_module("layers.0.q_proj")
    assert cfg.for_module("layers.0.v_proj") is cfg


def test_presets_save_and_load_in_a_fresh_process(tmp_path) -> None:
    expected = {}
    tiny_llama(4).save_pretrained(tmp_path / "base")
    for name in PRESETS:
        model = adapted(name, layers=4)
        with torch.no_grad(), ilora.routing_context(task_ids=[1, 0]):
            expected[name] = output(model, example_input("llama"))
        model.save_pretrained(tmp_path / name)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process: exact outputs
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ilora
        from peft import PeftModel
        from transformers import LlamaForCausalLM
        from conftest import example_input, output
        got = {{}}
        for name in {list(PRESETS)!r}:
            model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("base"), name).eval()
            with torch.no_grad(), ilora.routing_context(task_ids=[1, 0]):
                got[name] = output(model, example_input("llama"))
        torch.save(got, "got.pt")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    for name in PRESETS:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_keeps_noise_task_ids_and_padding() -> None:
    """The recomputation in backward draws the same jitter and router noise and sees the forward's task ids and
    mask, so LoRAMoE's constraint, the entropy term and the noisy gates give the same gradients."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        options = dict(router="noisy_token", routing="top_p", top_k=4, router_jitter_noise=0.1,
                       localized_balance_coef=0.1, localized_balance_alpha=0.1, router_entropy_coef=0.01)  # fmt: skip
        model = adapted("loramoe", **options).train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = example_input("llama")
        torch.manual_seed(3)
        loss = model(**ids, labels=ids["input_ids"], ilora_task_ids=[1, 0]).loss + ilora.aux_loss(model)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert any(n.endswith("noise_weight") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_a_pattern_written_for_another_depth_is_refused() -> None:
    # MoLA's pattern names every layer of the model it was written for: on a 2-layer model, the keys for layers
    # 2..31 would match nothing and the remaining layers would get the wrong quarter's expert counts.
    with pytest.raises(ValueError, match=r"num_experts_pattern: 30 of its 32 keys match no module"):
        get_peft_model(build("llama"), ilora.ILoraConfig.mola())
    custom = ilora.ILoraConfig(num_experts=4, target_modules=["q_proj"], num_experts_pattern={r"layers\.5\..*": 2})
    with pytest.raises(ValueError, match=r"1 of its 1 keys match no module"):
        get_peft_model(build("llama"), custom)


def test_mola_written_for_fewer_layers_than_the_model_is_refused() -> None:
    """mola(num_layers=4) on 8 layers would leave layers 4..7 at 8 experts: MoLA's 2-4-6-8 silently lost."""
    with pytest.raises(ValueError, match=r"names layers 0\.\.3 one by one, but this model has 8 layers.*num_layers=8"):
        get_peft_model(tiny_llama(8), ilora.ILoraConfig.mola(num_layers=4, r=2))
    model = get_peft_model(tiny_llama(8), ilora.ILoraConfig.mola(num_layers=8, r=2))
    counts = [m.ilora_config["default"].num_experts for m in ilora.ilora_layers(model) if "q_proj" in m.ilora_name]
    assert counts == [2, 2, 4, 4, 6, 6, 8, 8]
    # The way out for a deliberate default: a catch-all key, last.
    pattern = {**ilora.ILoraConfig.mola(num_layers=4).num_experts_pattern, r"layers\.\d+\..*": 3}
    model = get_peft_model(tiny_llama(8), ilora.ILoraConfig.mola(num_layers=4, r=2, num_experts_pattern=pattern))
    assert [m.ilora_config["default"].num_experts for m in ilora.ilora_layers(model) if "q_proj" in m.ilora_name] == [
        2, 4, 6, 8, 3, 3, 3, 3]  # fmt: skip
