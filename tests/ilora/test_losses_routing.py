"""LoRAMoE's localized balancing constraint and the per-layer entropy regulariser: against the reference formula,
padding left out, statistics that add across data-parallel shards."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import ilora
from ilora.aux_losses import EXTRA_STATS, cv_squared_from_sums, layer_stats, weighted_aux_loss


class OneLinear(nn.Module):
    def __init__(self, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def loramoe_blcls(route_weight: torch.Tensor, task_types: torch.Tensor, alpha: float, weight: float) -> torch.Tensor:
    """The ``blcls`` term of ``Linear.forward`` in ``peft/tuners/lora.py`` of Ablustrund/LoRAMoE, transcribed:
    ``route_weight [B, S, N]``, ``task_types [B]`` in {0, 1}."""
    n = route_weight.shape[-1]
    task_types = task_types.view(-1, 1)
    favoured = torch.concat(((task_types == 1).repeat(1, n // 2), (task_types == 0).repeat(1, n // 2)), dim=-1)
    x = (route_weight.sum(dim=1) * torch.where(favoured, 1.0 + alpha, 1.0 - alpha)).flatten()
    if x.shape[0] == 1:
        return torch.zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10) * weight


def localized_model(num_experts: int, alpha: float, **extra) -> nn.Module:
    cfg = ilora.ILoraConfig(r=2, num_experts=num_experts, target_modules=["proj"], localized_balance_coef=0.3,
                            localized_balance_alpha=alpha, num_expert_groups=2, task_expert_groups=[1, 0],
                            **extra)  # fmt: skip
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), cfg).train()


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 6),
    half=st.integers(1, 4),
    alpha=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_localized_balance_matches_loramoe(batch: int, seq: int, half: int, alpha: float, seed: int) -> None:
    model = localized_model(2 * half, alpha)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 6, generator=g) * 3
    task_types = torch.randint(0, 2, (batch,), generator=g)
    model(x, ilora_task_ids=task_types)
    layer = model.base_model.model.proj
    route_weight = torch.softmax(layer.ilora_router["default"](x).view(batch, seq, -1), dim=-1)
    want = loramoe_blcls(route_weight, task_types, alpha, 0.3)
    torch.testing.assert_close(ilora.aux_loss(model), want, rtol=2e-4, atol=1e-6)


def test_localized_balance_leaves_padding_out_and_adds_across_shards() -> None:
    model = localized_model(4, 0.2)
    layer = model.base_model.model.proj
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, generator=g)
    tasks = torch.tensor([0, 1, 1, 0])
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, :2] = 0
    with ilora.routing_context(task_ids=tasks, attention_mask=mask):
        model(x)
    whole = layer.aux_stats["default"]
    garbage = x.clone()
    garbage[1, :2] = 100.0  # padded positions: anything there must not count
    with ilora.routing_context(task_ids=tasks, attention_mask=mask):
        model(garbage)
    torch.testing.assert_close(layer.aux_stats["default"], whole)
    shards = []
    for rows in (slice(0, 1), slice(1, 4)):  # two data-parallel ranks
        with ilora.routing_context(task_ids=tasks[rows], attention_mask=mask[rows]):
            model(x[rows])
        shards.append(layer.aux_stats["default"])
    torch.testing.assert_close(shards[0] + shards[1], whole, rtol=1e-6, atol=1e-6)
    config = layer.ilora_config["default"]
    torch.testing.assert_close(weighted_aux_loss(config, shards[0] + shards[1]), weighted_aux_loss(config, whole))


def test_cv_squared_is_the_unbiased_variance_over_the_squared_mean() -> None:
    v = torch.tensor([1.0, 2.0, 4.0, 7.0])
    sums = torch.stack([v.sum(), v.pow(2).sum(), torch.tensor(4.0)])
    torch.testing.assert_close(cv_squared_from_sums(sums), v.var() / v.mean() ** 2)
    assert cv_squared_from_sums(torch.tensor([3.0, 9.0, 1.0])).item() == 0.0


def test_localized_balance_needs_task_ids() -> None:
    model = localized_model(4, 0.1)
    with pytest.raises(ValueError, match="ilora_task_ids"):
        model(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"task ids \[0, 2\] out of range"):
        model(torch.randn(2, 3, 6), ilora_task_ids=[0, 2])


def test_entropy_regulariser_is_the_mean_token_entropy_and_sharpens_routing() -> None:
    cfg = ilora.ILoraConfig(r=2, num_experts=4, target_modules=["proj"], router_entropy_coef=0.5)
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), cfg).train()
    layer = model.base_model.model.proj
    x = torch.randn(3, 4, 6)
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[0, :3] = 0
    with ilora.routing_context(attention_mask=mask):
        model(x)
    p = torch.softmax(layer.ilora_router["default"](x)[mask.reshape(-1).bool()], -1)
    want = 0.5 * -(p * p.log()).sum(-1).mean()
    loss = ilora.aux_loss(model)
    torch.testing.assert_close(loss, want)
    loss.backward()
    with torch.no_grad():
        layer.ilora_router["default"].weight -= 1.0 * layer.ilora_router["default"].weight.grad
        p2 = torch.softmax(layer.ilora_router["default"](x)[mask.reshape(-1).bool()], -1)
    assert -(p2 * p2.log()).sum(-1).mean() < want / 0.5, "a gradient step on the regulariser lowers the entropy"


def test_existing_losses_unchanged_and_extra_stats_zero_when_off() -> None:
    cfg = ilora.ILoraConfig(r=2, num_experts=3, target_modules=["proj"], balance_loss_coef=1.0)
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), cfg).train()
    layer = model.base_model.model.proj
    x = torch.randn(2, 4, 6)
    model(x)
    stats = layer.aux_stats["default"]
    assert stats.shape == (2 * 3 + 3 + EXTRA_STATS,) and stats[-EXTRA_STATS:].abs().sum() == 0
    logits = layer.ilora_router["default"](x)
    from ilora.losses import balance_loss

    gates = ilora.registry.apply_gate(cfg, logits, True)
    torch.testing.assert_close(ilora.aux_loss(model), balance_loss(logits, gates))
    torch.testing.assert_close(layer_stats(logits, gates, x, cfg), stats)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"router_entropy_coef": -1.0}, "router_entropy_coef"),
    ({"localized_balance_coef": float("nan")}, "localized_balance_coef"),
    ({"localized_balance_alpha": 1.0}, "localized_balance_alpha"),
    ({"num_experts": 3, "num_expert_groups": 2, "localized_balance_coef": 0.1}, "num_expert_groups"),
    ({"num_expert_groups": 0}, "num_expert_groups"),
    ({"num_experts": 4, "num_expert_groups": 2, "task_expert_groups": [0, 2]}, "task_expert_groups"),
])  # fmt: skip
def test_invalid_settings_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}"):
        ilora.ILoraConfig(**kwargs)


def test_fields_round_trip(tmp_path) -> None:
    cfg = ilora.ILoraConfig(num_experts=4, localized_balance_coef=0.1, localized_balance_alpha=0.1,
                            num_expert_groups=2, task_expert_groups=[1, 0], router_entropy_coef=0.01)  # fmt: skip
    cfg.save_pretrained(tmp_path)
    assert ilora.ILoraConfig.from_pretrained(tmp_path).to_dict() == cfg.to_dict()
