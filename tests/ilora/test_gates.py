"""Dynamic top-p routing, noisy top-k gating and router jitter: against their references, in the layer, saved."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

import ilora
from ilora.gates import NoisyTokenRouter, jitter, top_p_gates
from ilora.losses import balance_loss, router_stats
from ilora.router import TokenRouter

from .conftest import build, example_input, output, targets
from .oracle import naive_delta


def moe_peft_dynamic_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """MoE-PEFT's ``_dynamic_top_p`` (TUDB-Labs/MoE-PEFT, ``moe_peft/adapters/mixlora/model.py``, temperature 0) step by
    step, scattered back to dense ``[T, E]`` weights (dropped experts 0)."""
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    mask = cumulative > top_p
    threshold = torch.nn.functional.one_hot(mask.long().argmax(dim=-1), num_classes=probs.shape[-1]).bool()
    mask = mask & ~threshold
    kept = sorted_probs.masked_fill(mask, 0.0)
    return torch.zeros_like(probs).scatter(1, sorted_indices, kept)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(1, 9),
    top_p=st.floats(0.05, 1.0),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_top_p_matches_moe_peft(tokens: int, experts: int, top_p: float, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tokens, experts, generator=g) * scale, dim=-1)
    want = moe_peft_dynamic_top_p(probs, top_p)
    gates = top_p_gates(probs, top_p, max_k=experts)
    assert gates.weights.shape == gates.indices.shape == (tokens, experts)
    torch.testing.assert_close(gates.to_dense(experts), want, rtol=0, atol=0)
    # A cap on the experts per token keeps the same experts, the most probable ones, up to the cap.
    k = max(1, experts // 2)
    capped = top_p_gates(probs, top_p, max_k=k)
    sorted_want = want.gather(1, capped.indices)
    torch.testing.assert_close(capped.weights, sorted_want, rtol=0, atol=0)
    assert bool((capped.weights[:, 0] > 0).all()), "every token keeps at least its top expert"


def test_top_p_weights_vary_the_expert_count_per_token() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    gates = top_p_gates(probs, 0.8, max_k=3)
    assert (gates.weights != 0).sum(-1).tolist() == [1, 3]


def test_router_stats_count_only_used_slots() -> None:
    """A top-p slot of weight 0 is no assignment: the balance loss's shares count only the experts used."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, -0.1]])
    gates = top_p_gates(torch.softmax(logits, -1), 0.8, max_k=3)
    stats = router_stats(logits, gates)
    share_sum, share_count = stats[3:6], stats[6]
    used = (gates.weights != 0).sum().item()
    assert share_count.item() == used == 4
    assert share_sum.tolist() == [2.0, 1.0, 1.0]


def moe_peft_dynamic_balance(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``DynamicRouterLoss.forward`` without its coefficient, i.e. ``_dynamic_load_balancing_loss_func`` on
    ``softmax(logits)`` (MoE-PEFT, ``moe_peft/adapters/mixlora/model.py``, temperature 0), step by step: the fraction
    of tokens sending each of their kept slots to expert e, summed over slots, times the mean probability, times E."""
    probs = torch.softmax(logits, dim=-1)
    num_experts = probs.shape[-1]
    sorted_probs, selected = torch.sort(probs, dim=-1, descending=True)
    mask = sorted_probs.cumsum(-1) > top_p
    mask = mask & ~torch.nn.functional.one_hot(mask.long().argmax(-1), num_classes=num_experts).bool()
    selected = selected.masked_fill(mask, -1)
    expert_mask = torch.stack([(selected == e).transpose(0, 1) for e in range(num_experts)]).float()
    tokens_per_expert = expert_mask.permute(2, 1, 0).mean(0)  # [slot, expert]
    return (tokens_per_expert * probs.mean(0).unsqueeze(0)).sum() * num_experts


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 12), experts=st.integers(2, 8), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_top_p_balance_is_moe_peft_dynamic_loss_over_the_mean_expert_count(
    tokens: int, experts: int, top_p: float, seed: int
) -> None:
    """ilora's balance loss under top-p routing normalises the expert shares by the assignments made (so it is 1 at
    uniform use whatever the number of experts per token); MoE-PEFT's dynamic loss normalises by the tokens. The
    two differ by the batch's mean number of experts per token, k_mean, which no constant coefficient absorbs."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 3
    gates = top_p_gates(torch.softmax(logits, -1), top_p, max_k=experts)  # MoE-PEFT caps at every expert
    k_mean = (gates.weights != 0).sum() / tokens
    want = moe_peft_dynamic_balance(logits, top_p) / k_mean
    torch.testing.assert_close(balance_loss(logits, gates), want, rtol=1e-5, atol=1e-6)


def test_top_p_balance_is_one_at_uniform_use() -> None:
    # Two tokens keep one expert each, two keep two: MoE-PEFT's loss is k_mean = 1.5 here, ilora's 1.
    logits = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.0, 0.0], [0.0, 0.0]])
    gates = top_p_gates(torch.softmax(logits, -1), 0.6, max_k=2)
    assert (gates.weights != 0).sum(-1).tolist() == [1, 1, 2, 2]
    assert balance_loss(logits, gates).item() == pytest.approx(1.0)
    assert moe_peft_dynamic_balance(logits, 0.6).item() == pytest.approx(1.5)


def make(routing_options: dict, **extra) -> PeftModel:
    cfg = ilora.ILoraConfig(r=4, lora_alpha=8, target_modules=targets("llama"), init_lora_weights=False,
                            shared_a=False, **routing_options, **extra)  # fmt: skip
    return get_peft_model(build("llama"), cfg)


@pytest.mark.parametrize("num_experts, top_k", [(4, 4), (6, 3)])
def test_top_p_layer_forward_backward_match_the_oracle(num_experts: int, top_k: int) -> None:
    model = make(dict(num_experts=num_experts, routing="top_p", top_k=top_k, top_p=0.6))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = (5 * torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))).requires_grad_()
    A, B = layer.ilora_A["default"], layer.ilora_B["default"]
    y = layer(x)
    probs = torch.softmax(layer.ilora_router["default"](x), -1)
    dense = top_p_gates(probs, 0.6, top_k).to_dense(num_experts)
    assert len(set((dense != 0).sum(-1).tolist())) > 1, "the example should route tokens to varying expert counts"
    want = layer.base_layer(x).reshape(-1, layer.out_features) + naive_delta(
        x.reshape(-1, layer.in_features), A, B, dense, layer.scaling["default"]
    ).to(x.dtype)
    torch.testing.assert_close(y.reshape(-1, layer.out_features), want, rtol=1e-5, atol=1e-5)
    (gy,) = torch.autograd.grad(y.square().sum(), [layer.ilora_router["default"].weight])
    (gw,) = torch.autograd.grad(want.square().sum(), [layer.ilora_router["default"].weight])
    torch.testing.assert_close(gy, gw, rtol=1e-4, atol=1e-5)


def test_noisy_router_is_shazeer_noisy_gating_in_training_only() -> None:
    torch.manual_seed(0)
    router = NoisyTokenRouter(6, 4)
    clean = TokenRouter(6, 4)
    clean.weight.data.copy_(router.weight.data)
    torch.nn.init.normal_(router.noise_weight)
    x = torch.randn(2, 3, 6)
    router.eval()
    torch.testing.assert_close(router(x), clean(x), rtol=0, atol=0)
    router.train()
    torch.manual_seed(7)
    noisy = router(x)
    torch.manual_seed(7)
    eps = torch.randn(6, 4)
    std = torch.nn.functional.softplus(x.reshape(6, 6) @ router.noise_weight.T)
    torch.testing.assert_close(noisy, clean(x) + eps * std, rtol=1e-6, atol=1e-6)
    noisy.sum().backward()
    assert router.noise_weight.grad is not None and bool(router.noise_weight.grad.abs().sum() > 0)


def test_jitter_scales_only_the_router_input_in_training() -> None:
    x = torch.randn(50, 8)
    assert jitter(x, 0.1, training=False) is x and jitter(x, 0.0, training=True) is x
    ratio = jitter(x, 0.1, training=True) / x
    assert bool(((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all()) and ratio.std() > 0.01

    model = make(dict(num_experts=3, routing="topk", top_k=2), router_jitter_noise=0.2)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    h = torch.randn(2, 4, layer.in_features)
    layer.eval()
    plain = layer(h)
    layer.ilora_config["default"].router_jitter_noise = 0.0
    torch.testing.assert_close(layer(h), plain, rtol=0, atol=0)  # eval: no jitter
    layer.ilora_config["default"].router_jitter_noise = 0.2
    layer.train()
    torch.manual_seed(5)
    got = layer(h)
    torch.manual_seed(5)
    u = torch.empty_like(h).uniform_(0.8, 1.2)
    logits = layer.ilora_router["default"](h * u)
    dense = ilora.registry.apply_gate(layer.ilora_config["default"], logits, True).to_dense(3)
    flat = h.reshape(-1, layer.in_features)  # the experts and the frozen weight see the clean input
    want = layer.base_layer(flat) + naive_delta(flat, layer.ilora_A["default"], layer.ilora_B["default"], dense,
                                                layer.scaling["default"]).float()  # fmt: skip
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"routing": "top_p", "top_p": 0.0}, "top_p"),
    ({"routing": "top_p", "top_p": 1.5}, "top_p"),
    ({"routing": "top_p", "top_k": 9, "num_experts": 4}, "top_k"),
    ({"router_jitter_noise": 1.0}, "router_jitter_noise"),
    ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
])  # fmt: skip
def test_invalid_settings_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}"):
        ilora.ILoraConfig(**kwargs)


def test_save_load_and_compile(tmp_path) -> None:
    """noisy_token + top_p + jitter: saved (the noise weights too), loaded equal, compiled equal in train mode."""
    options = dict(num_experts=4, router="noisy_token", routing="top_p", top_k=3, top_p=0.7)
    model = make(options, router_jitter_noise=0.05)
    for layer in ilora.ilora_layers(model):
        torch.nn.init.normal_(layer.ilora_router["default"].noise_weight, std=0.1)
    model.eval()
    inputs = example_input("llama")
    with torch.no_grad():
        expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].router == "noisy_token"
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, inputs), expected, rtol=0, atol=0)

    cfg = ilora.ILoraConfig(r=4, target_modules=targets("mlp"), init_lora_weights=False, router_jitter_noise=0.05,
                            **options)  # fmt: skip
    mlp = get_peft_model(build("mlp"), cfg).train()
    layer = mlp.base_model.model.fc_in
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager")
    x = example_input("mlp")["x"]
    torch.manual_seed(11)
    eager = layer(x)
    torch.manual_seed(11)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_experts", "top_k", "kernel"), [(4, 4, "soft"), (64, 4, "topk")])
def test_top_p_takes_the_triton_top_k_paths(num_experts, top_k, kernel, monkeypatch) -> None:
    """Dynamic routing is top-k with zero weights: the Triton kernels take it unchanged, gradients included."""
    pytest.importorskip("triton")
    from ilora import kernels

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    for op in ("soft", "topk", "per_row"):
        fn = getattr(kernels, f"{op}_routed_lora")
        monkeypatch.setattr(
            kernels, f"{op}_routed_lora", lambda *a, _fn=fn, _op=op, **k: calls.append(_op) or _fn(*a, **k)
        )
    cfg = ilora.ILoraConfig(r=8, num_experts=num_experts, shared_a=False, routing="top_p", top_k=top_k, top_p=0.5,
                            target_modules=["fc_in"], init_lora_weights=False, use_kernels="torch")  # fmt: skip
    torch_layer = get_peft_model(build("mlp"), cfg).base_model.model.fc_in
    triton_layer = copy.deepcopy(torch_layer)
    triton_layer.ilora_config["default"] = copy.copy(cfg)
    triton_layer.ilora_config["default"].use_kernels = "triton"
    x = 4 * example_input("mlp")["x"]
    results = []
    for layer in (torch_layer, triton_layer):
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [layer.ilora_A["default"], layer.ilora_B["default"]])
        results.append((y, grads))
    assert calls == [kernel]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
