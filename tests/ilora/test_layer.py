"""The routed Linear against the float64 oracle, for every router and routing mode, gradients included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ilora
from ilora.layer import Linear

from .oracle import naive_delta, naive_gates

ROUTINGS = [("token", "soft"), ("token", "topk"), ("sequence", "soft"), ("sequence", "topk"), ("task", "soft"),
            ("task", "topk")]  # fmt: skip


def make_layer(d_in: int, d_out: int, dtype=torch.float64, **config) -> Linear:
    base = nn.Linear(d_in, d_out).to(dtype)
    base.requires_grad_(False)
    settings_ = dict(r=4, num_experts=3, init_lora_weights=False, target_modules=["x"])
    settings_.update(config)
    layer = Linear(base, "default", ilora.ILoraConfig(**settings_)).to(dtype)
    layer.ilora_name = "layer"
    return layer


def oracle_forward(layer: Linear, x: torch.Tensor, mask: torch.Tensor | None, task_ids: torch.Tensor | None):
    cfg = layer.ilora_config["default"]
    A, B = layer.ilora_A["default"], layer.ilora_B["default"]
    W = layer.ilora_router["default"].weight
    x2 = x.reshape(-1, x.shape[-1])
    if cfg.router == "token" or (cfg.router == "sequence" and x.dim() == 2):
        logits = x2 @ W.T
    elif cfg.router == "sequence":
        m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask[:, -x.shape[1] :].to(x.dtype)
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        logits = (pooled @ W.T).repeat_interleave(x.shape[1], 0)
    else:
        logits = W[task_ids].repeat_interleave(x2.shape[0] // task_ids.numel(), 0)
    gates = naive_gates(logits, cfg.routing, cfg.top_k, cfg.router_temperature)
    y = layer.base_layer(x).reshape(-1, B.shape[2]).double() + naive_delta(x2, A, B, gates, layer.scaling["default"])
    return y.reshape(*x.shape[:-1], -1)


@settings(max_examples=30, deadline=None)
@given(
    routing=st.sampled_from(ROUTINGS),
    E=st.integers(1, 8),
    r=st.integers(1, 64),
    d_in=st.integers(1, 21),
    d_out=st.integers(1, 21),
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    shared=st.booleans(),
    three_d=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_layer_matches_oracle_and_its_gradients(routing, E, r, d_in, d_out, batch, seq, shared, three_d, seed):
    router, mode = routing
    torch.manual_seed(seed)
    layer = make_layer(d_in, d_out, r=r, num_experts=E, shared_a=shared, router=router, routing=mode,
                       top_k=min(2, E), num_tasks=4 if router == "task" else None)  # fmt: skip
    x = torch.randn((batch, seq, d_in) if three_d else (batch * seq, d_in), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 0] = 0 if seq > 1 else 1
    n_ids = batch if three_d else batch * seq
    task_ids = torch.randint(0, 4, (n_ids,))
    with ilora.routing_context(task_ids=task_ids, attention_mask=mask if three_d else None):
        out = layer(x)
    ref = oracle_forward(layer, x, mask if three_d else None, task_ids)
    torch.testing.assert_close(out, ref)
    params = [x, layer.ilora_A["default"], layer.ilora_B["default"], layer.ilora_router["default"].weight]
    assert params[-1].requires_grad == (E > 1)  # a single expert's router is frozen: it never gets a gradient
    params = params if E > 1 else params[:-1]
    cot = torch.randn_like(out)
    got = torch.autograd.grad(out, params, cot, allow_unused=True)
    want = torch.autograd.grad(ref, params, cot, allow_unused=True)
    for name, g, w in zip(["x", "A", "B", "router"], got, want):
        if w is None:  # a single expert: the router cannot influence the output
            assert E == 1 or g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, w, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_fresh_adapter_leaves_output_unchanged() -> None:
    base = nn.Linear(8, 6)
    layer = Linear(base, "default", ilora.ILoraConfig.crab(num_experts=4, target_modules=["x"]))
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.ilora_B["default"].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_follow_the_base_layer(dtype) -> None:
    layer = make_layer(16, 12, dtype=dtype, router="token", routing="topk", top_k=2)
    x = torch.randn(3, 5, 16).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    ref = oracle_forward(layer, x, None, None)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    out.float().sum().backward()
    assert layer.ilora_B["default"].grad.dtype == dtype


def test_recorder_sees_every_layer_and_costs_nothing_when_off() -> None:
    layer = make_layer(8, 8, dtype=torch.float32)
    x = torch.randn(4, 8)
    with ilora.record_routing() as rec:
        layer(x)
        layer(x)
    assert len(rec.weights["layer"]) == 2 and rec.weights["layer"][0].shape == (4, 3)
    torch.testing.assert_close(rec.weights["layer"][0].sum(-1), torch.ones(4))
    torch.testing.assert_close(rec.usage()["layer"].sum(), torch.tensor(1.0))
    layer(x)  # outside the context nothing is recorded
    assert len(rec.weights["layer"]) == 2


def test_aux_losses_are_collected_and_trainable() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    from peft import get_peft_model

    cfg = ilora.ILoraConfig(target_modules=["0", "1"], num_experts=4, routing="topk", top_k=1,
                            balance_loss_coef=0.5, router_z_loss_coef=0.1)  # fmt: skip
    pm = get_peft_model(model, cfg)
    pm.train()
    pm(torch.randn(16, 8))
    loss = ilora.aux_loss(pm)
    assert loss.item() > 0.5  # balance term alone is >= 1 * 0.5
    loss.backward()
    assert pm.base_model.model[0].ilora_router["default"].weight.grad.abs().sum() > 0
    pm.eval()
    pm(torch.randn(16, 8))
    assert ilora.aux_loss(pm).item() == 0.0  # nothing stale from the training forward


def test_balance_loss_is_one_at_uniform_usage() -> None:
    from ilora.losses import balance_loss
    from ilora.router import gate

    logits = torch.zeros(12, 4)
    assert balance_loss(logits, gate(logits, "soft", 1, 1.0)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(12, 1)
    assert balance_loss(collapsed, gate(collapsed, "topk", 1, 1.0)).item() > 3.5


# ------------------------------------------------------------------------------------------------- bad input
def test_wrong_input_width_names_the_shape() -> None:
    layer = make_layer(8, 4)
    with pytest.raises(ValueError, match=r"width 8, got shape \(2, 7\)"):
        layer(torch.randn(2, 7, dtype=torch.float64))


def test_non_finite_router_logits_raise() -> None:
    layer = make_layer(8, 4, dtype=torch.float32)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite logits .* tokens \[1\]"):
        layer(x)


def test_task_routing_without_task_ids_says_how_to_pass_them() -> None:
    layer = make_layer(8, 4, router="task", num_tasks=3)
    with pytest.raises(ValueError, match="task_ids"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_task_ids_out_of_range_and_wrong_count() -> None:
    layer = make_layer(8, 4, router="task", num_tasks=3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with ilora.routing_context(task_ids=[0, 3]), pytest.raises(ValueError, match=r"in \[0, 3\)"):
        layer(x)
    with ilora.routing_context(task_ids=[0, 1, 2]), pytest.raises(ValueError, match="3 task ids"):
        layer(x)


def test_unsupported_module_type_is_named() -> None:
    with pytest.raises(TypeError, match="Conv1d"):
        Linear(nn.Conv1d(3, 3, 1), "default", ilora.ILoraConfig(target_modules=["x"]))


def test_forced_triton_without_a_runnable_triton_is_an_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make_layer(8, 4, dtype=torch.float32, use_kernels="triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU can run Triton")
    with pytest.raises(RuntimeError, match="use_kernels='triton'"):
        layer(torch.randn(2, 8))


def test_padding_does_not_count_in_the_router_losses() -> None:
    # The same two sequences padded to 7 or to 11 tokens: the aux loss must not see the difference, or it would
    # depend on how a global batch is split over data-parallel ranks (each pads to its own longest sequence).
    from peft import get_peft_model

    from .conftest import build, targets

    cfg = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=2, target_modules=targets("llama"),
                            balance_loss_coef=1.0, router_z_loss_coef=0.1)  # fmt: skip
    model = get_peft_model(build("llama"), cfg)
    model.train()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # the second sequence is 4 tokens long
    losses = []
    for extra in (0, 4):
        padded_ids = torch.cat([ids, torch.zeros(2, extra, dtype=ids.dtype)], 1)
        padded_mask = torch.cat([mask, torch.zeros(2, extra, dtype=mask.dtype)], 1)
        model(input_ids=padded_ids, attention_mask=padded_mask)
        losses.append(ilora.aux_loss(model))
    torch.testing.assert_close(losses[0], losses[1])
    model(input_ids=ids)  # without a mask every token counts
    assert not torch.allclose(ilora.aux_loss(model), losses[0])
