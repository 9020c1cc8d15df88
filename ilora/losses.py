"""Auxiliary router losses (load balance, z-loss) and ``aux_loss``, which collects them from a whole model.

Layers compute their losses during a training forward only when a coefficient is set; ``aux_loss`` then sums
``coef * loss`` per adapter and averages over routed layers, so a coefficient means the same at any depth.
"""

from __future__ import annotations

import torch
from torch import nn

from .router import Gates


def balance_loss(logits: torch.Tensor, gates: Gates) -> torch.Tensor:
    """``E * sum_e f_e * P_e``: P the mean router probability, f the share of assignments (top-k) or P (soft).

    Equals 1 at perfectly uniform usage and grows as routing collapses onto few experts.
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1).mean(0)
    if gates.indices is None:
        share = probs
    else:
        counts = torch.bincount(gates.indices.reshape(-1), minlength=num_experts).to(probs.dtype)
        share = counts / gates.indices.numel()
    return num_experts * (share * probs).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The weighted auxiliary router losses of the last training forward of ``model`` (0 when none are set)."""
    from .layer import ILoraLayer

    total: torch.Tensor | None = None
    layers = 0
    for module in model.modules():
        if not isinstance(module, ILoraLayer) or not module._aux:
            continue
        layers += 1
        for name, (balance, z) in module._aux.items():
            config = module.ilora_config[name]
            term = config.balance_loss_coef * balance + config.router_z_loss_coef * z
            total = term if total is None else total + term
    if total is None:
        device = next(model.parameters()).device
        return torch.zeros((), device=device)
    return total / layers
