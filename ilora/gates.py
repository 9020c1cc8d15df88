"""Gates and routers beyond the soft and top-k basics: dynamic top-p routing, noisy top-k (Shazeer et al. 2017) and
router input jitter (MixLoRA / Mixtral). Registered in ``ilora.registry`` under ``"top_p"`` and ``"noisy_token"``.

Every gate here returns top-k shaped ``Gates`` (``weights``, ``indices`` ``[T, k]``), so the existing top-k compute
paths (PyTorch and Triton) take them unchanged; a variable number of experts per token is a fixed ``k`` (the maximum)
with the unused slots' weights zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .router import Gates, TokenRouter

if TYPE_CHECKING:
    from .config import ILoraConfig


def top_p_gates(probs: torch.Tensor, top_p: float, max_k: int) -> Gates:
    """Dynamic top-p routing: per token, the most probable experts until their cumulative probability exceeds
    ``top_p`` (the expert that crosses it included), at most ``max_k``; weights are the router probabilities, not
    renormalized (so they sum to less than 1 when fewer than all experts are kept).

    ``probs [T, E]`` (rows summing to 1); returns ``weights``, ``indices`` ``[T, max_k]`` with the unused slots'
    weights exactly 0 (their indices are valid expert ids, so any top-k path computes them as no-ops). Follows
    MoE-PEFT's dynamic MixLoRA, ``_dynamic_top_p`` in ``moe_peft/adapters/mixlora/model.py`` (TUDB-Labs/MoE-PEFT),
    whose maximum is every expert (``max_k = E``); its ``temperature`` (default 0, off) divides the probabilities, where
    ilora's ``router_temperature`` divides the logits before the softmax.
    """
    values, indices = probs.topk(max_k, dim=-1)  # sorted, descending
    cumulative = values.cumsum(-1)
    # Mass before each slot: keep the slot while that is <= top_p (the slot that crosses top_p is kept).
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    weights = torch.where(before <= top_p, values, torch.zeros_like(values))
    return Gates(weights=weights, indices=indices)


class TopPGate:
    """``routing="top_p"``: dynamic top-p routing (see ``top_p_gates``) with ``top_p`` and at most ``top_k`` experts
    per token, on ``softmax(logits / router_temperature)``.

    Its load-balance loss (``balance_loss_coef``) is ilora's ``E * sum_e f_e P_e`` with ``f_e`` the share of the
    layer's assignments that go to expert ``e`` (summing to 1, so the loss is 1 at uniform use whatever the number of
    experts per token). MoE-PEFT's ``DynamicRouterLoss`` (``_dynamic_load_balancing_loss_func``,
    ``moe_peft/adapters/mixlora/model.py``) divides the assignments by the tokens instead, so its loss is ilora's
    times ``k_mean``, the batch's mean number of experts per token (between 1 and ``top_k``, changing every step: no
    constant coefficient converts one into the other); it also counts padding tokens and lets a token keep every
    expert (ilora: at most ``top_k``; MoE-PEFT's is ``top_k = num_experts``).
    """

    def __init__(self, config: ILoraConfig) -> None:
        self.top_p, self.max_k, self.temperature = config.top_p, config.top_k, config.router_temperature

    def __call__(self, logits: torch.Tensor, training: bool) -> Gates:
        return top_p_gates(torch.softmax(logits / self.temperature, dim=-1), self.top_p, self.max_k)


class NoisyTokenRouter(TokenRouter):
    """``router="noisy_token"``: noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 4),
    ``H(x) = x W_g + eps * softplus(x W_noise)``, ``eps ~ N(0, 1)`` per token and expert, in training only (clean
    logits ``x W_g`` in eval). ``weight [E, d_in]`` is ``W_g`` (initialised as ``TokenRouter``), ``noise_weight
    [E, d_in]`` is ``W_noise`` (zero at initialisation as in the paper: noise of std ``softplus(0) = 0.69``).
    Returns logits ``[T, E]`` (at least float32); use it with ``routing="topk"`` for the paper's KeepTopK + softmax.
    """

    def __init__(self, d_in: int, num_experts: int) -> None:
        super().__init__(d_in, num_experts)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean = super().forward(x)
        if not self.training:
            return clean
        x2 = x.reshape(-1, x.shape[-1]).to(self.noise_weight.dtype)
        std = nn.functional.softplus(nn.functional.linear(x2, self.noise_weight).to(clean.dtype))
        return clean + torch.randn_like(clean) * std


def jitter(x: torch.Tensor, noise: float, training: bool) -> torch.Tensor:
    """The router's input multiplied by ``U(1 - noise, 1 + noise)`` per element, in training only: the jitter of
    Switch Transformers (router input only). MixLoRA's ``jitter_noise`` draws the same noise but multiplies the whole
    block input in place (``MixLoraSparseMoe.forward`` in the ``mixlora`` package, ``MixtralSparseMoe.forward`` in
    MoE-PEFT's ``moe_peft/adapters/mixlora/model.py``), so there the frozen projections and the experts see it too,
    and the ``mixlora`` package (inference code) applies it in eval as well. Here the base layer and the experts
    always see the clean input: the frozen model stays exact."""
    if not training or noise == 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - noise, 1.0 + noise)
