"""Crab (v1) draws a dropout mask per expert; Crab+ shares one.

The oracle is the authors' loop, restated from ``peft_hyper/tuners/lora.py`` (``Linear.forward``) of GeWu-Lab/Crab::

    route_weight = softmax(lora_route(x), dim=-1, dtype=float32)
    for i in range(lora_num):
        result = result + route_weight[..., i:i+1] * lora_B{i}(lora_A(lora_dropout(x))) * scaling

where ``lora_dropout`` is called anew inside the loop, so head ``i`` sees its own mask. Crab+ (GeWu-Lab/Crab_Plus, same
file) calls it once before the loop.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import ilora

D_IN, D_OUT, T, P = 12, 10, 9, 0.4


class RecordingDropout(nn.Module):
    """Inverted dropout that keeps the masks it drew, so the oracle can replay them."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = torch.bernoulli(torch.full_like(x, 1 - self.p))
        self.masks.append(mask)
        return x * mask / (1 - self.p)


def _layer(config: ilora.ILoraConfig):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(D_IN, D_OUT)), config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.ilora_B["default"].normal_()
    layer.ilora_dropout["default"] = RecordingDropout(P)
    return model.train(), layer


def _authors_loop(layer, x: torch.Tensor, head_masks: list[torch.Tensor]) -> torch.Tensor:
    A, B = layer.ilora_A["default"], layer.ilora_B["default"]
    w = torch.softmax(layer.ilora_router["default"](x), dim=-1, dtype=torch.float32)
    result = layer.base_layer(x)
    for i, mask in enumerate(head_masks):
        h = (x * mask / (1 - P)) @ A[i % A.shape[0]]  # one shared A (Crab), or one per expert
        result = result + w[:, i : i + 1] * (h @ B[i]) * layer.scaling["default"]
    return result


@pytest.mark.parametrize("shared_a", [True, False])
def test_crab_preset_draws_a_mask_per_expert_and_matches_the_authors_loop(shared_a):
    config = ilora.ILoraConfig.crab(target_modules=["0"], r=4, lora_dropout=P, use_kernels="torch", shared_a=shared_a)
    assert config.dropout_per_expert
    model, layer = _layer(config)
    x = torch.randn(T, D_IN, requires_grad=True)
    out = model(x)
    (drawn,) = layer.ilora_dropout["default"].masks
    assert drawn.shape == (T, 3, D_IN)
    assert not torch.equal(drawn[:, 0], drawn[:, 1])  # independent masks (identical with odds 0.52^108)
    x_ref = x.detach().clone().requires_grad_(True)
    want = _authors_loop(layer, x_ref, [drawn[:, i] for i in range(3)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.ilora_A["default"], layer.ilora_B["default"]], g)
    want_grads = torch.autograd.grad(want, [x_ref, layer.ilora_A["default"], layer.ilora_B["default"]], g)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_crabplus_preset_shares_one_mask():
    config = ilora.ILoraConfig.crabplus(target_modules=["0"], r=4, lora_dropout=P, use_kernels="torch")
    assert not config.dropout_per_expert
    model, layer = _layer(config)
    x = torch.randn(T, D_IN)
    out = model(x)
    (drawn,) = layer.ilora_dropout["default"].masks
    assert drawn.shape == (T, D_IN)
    torch.testing.assert_close(out, _authors_loop(layer, x, [drawn] * 3), rtol=1e-5, atol=1e-5)


def test_per_expert_dropout_is_identity_in_eval_and_validated():
    same = dict(target_modules=["0"], r=4, lora_alpha=8, lora_dropout=P, use_kernels="torch")
    model, layer = _layer(ilora.ILoraConfig.crab(**same))
    shared = ilora.ILoraConfig.crabplus(**same)
    other, _ = _layer(shared)
    model.eval(), other.eval()
    x = torch.randn(T, D_IN)
    torch.testing.assert_close(model(x), other(x))  # same seed, same weights: only training differs
    assert layer.ilora_dropout["default"].masks == []
    with pytest.raises(ValueError, match="dropout_per_expert"):
        ilora.ILoraConfig(dropout_per_expert="yes")
