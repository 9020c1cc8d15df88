"""Convergence (Liger style): a tiny model of two routed LoRA linears, trained with Adam, with the kernels and with the
PyTorch path (``ilora.functional``) from the same initialisation and data, gives the same loss curve.

On CPU (interpreter) a very small model runs a few steps so CI exercises it; on CUDA a larger one runs 50 steps in
fp32 and bf16. Tolerances: fp32 curves agree to a relative 1e-4 per step; in bf16 each curve is compared with an fp32
PyTorch run and the kernels may deviate at most twice as much as the bf16 PyTorch path does, plus 2% of the loss.
"""

from __future__ import annotations

import copy

import ilora.kernels as K
import pytest
import torch
from torch import nn

import ilora.functional as F


class RoutedLinear(nn.Module):
    """A frozen base linear plus routed LoRA experts behind a learned router (soft, top-k or one expert per row)."""

    def __init__(self, d_in: int, d_out: int, E: int, r: int, routing: str, shared: bool, gen: torch.Generator):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.router = nn.Linear(d_in, E, bias=False)
        self.A = nn.Parameter(torch.randn(1 if shared else E, d_in, r, generator=gen) * d_in**-0.5)
        self.B = nn.Parameter(torch.randn(E, r, d_out, generator=gen) * 0.1 * r**-0.5)
        self.routing = routing
        self.use_kernels = False
        self.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        base = self.base.to(self.dtype)(x)
        A, B = self.A.to(self.dtype), self.B.to(self.dtype)
        probs = self.router(x.float()).softmax(-1).to(self.dtype)
        if self.routing == "soft":
            args = (probs,)
        elif self.routing == "topk":
            args = probs.topk(2, dim=-1)
        else:  # one expert per row; its weight scales the row so the router still learns
            w, idx = probs.max(-1)
            x, args = x * w[:, None], (idx,)
        kernel, math = {
            "soft": (K.soft_routed_lora, F.soft_routed_lora),
            "topk": (K.topk_routed_lora, F.topk_routed_lora),
            "per_row": (K.per_row_routed_lora, F.per_row_routed_lora),
        }[self.routing]
        if self.use_kernels:
            return kernel(x, A, B, *args, 2.0, base_out=base)
        return base + math(x, A, B, *args, 2.0)


class TinyModel(nn.Module):
    def __init__(self, d: int, E: int, r: int, routing: str, shared: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.l1 = RoutedLinear(d, 2 * d, E, r, routing, shared, gen)
        self.l2 = RoutedLinear(2 * d, d, E, r, routing, shared, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))).float()

    def configure(self, use_kernels: bool, dtype: torch.dtype) -> TinyModel:
        for layer in (self.l1, self.l2):
            layer.use_kernels, layer.dtype = use_kernels, dtype
        return self


def _loss_curve(model: TinyModel, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _curves(device, d, E, r, T, steps, routing, shared, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, d, generator=gen).to(device)
    y = torch.sin(torch.randn(T, d, generator=gen) * 2).to(device)
    model = TinyModel(d, E, r, routing, shared).to(device)
    runs = [("kernels", True, dtype), ("torch", False, dtype)]
    if dtype != torch.float32:
        runs.append(("torch32", False, torch.float32))
    return {name: _loss_curve(copy.deepcopy(model).configure(kern, dt), x, y, steps) for name, kern, dt in runs}


CASES = [("soft", True), ("soft", False), ("topk", False), ("per_row", False)]


@pytest.mark.parametrize(("routing", "shared"), CASES)
def test_small_model_matches_torch_path(device, routing, shared):
    curves = _curves(device, d=12, E=4, r=4, T=24, steps=6, routing=routing, shared=shared, dtype=torch.float32)
    got, want = torch.tensor(curves["kernels"]), torch.tensor(curves["torch"])
    assert ((got - want).abs() <= 1e-4 * want.abs()).all(), (got, want)
    assert want[-1] < want[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("routing", "shared"), CASES)
def test_convergence_gpu(device, routing, shared, dtype):
    curves = _curves(device, d=256, E=8, r=16, T=512, steps=50, routing=routing, shared=shared, dtype=dtype)
    got, lowp = torch.tensor(curves["kernels"]), torch.tensor(curves["torch"])
    ref = torch.tensor(curves.get("torch32", curves["torch"]))
    if dtype == torch.float32:
        assert ((got - ref).abs() <= 1e-4 * ref.abs()).all(), (got, ref)
    else:
        assert ((got - ref).abs() <= 2 * (lowp - ref).abs() + 0.02 * ref.abs()).all(), (got, lowp, ref)
    assert ref[-1] < 0.5 * ref[0]
