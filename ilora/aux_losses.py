"""Per-layer router statistics for every auxiliary loss, and the weighted loss of one adapter from them.

Besides the Switch balance and z-loss statistics (``ilora.losses.router_stats``), a layer's vector carries
``EXTRA_STATS`` more sums, all over tokens or sequences, so they add across data-parallel ranks like the others:

- ``entropy_sum``: ``sum_t H(p_t)``, ``p_t = softmax(logits_t)``, for the per-layer entropy regulariser
  ``router_entropy_coef * mean_t H(p_t)`` (positive: sharper, more decisive routing);
- ``v_sum``, ``v_sq_sum``, ``v_count``: LoRAMoE's localized balancing constraint (Dou et al. 2024, the
  ``blcls`` term of ``Linear.forward`` in ``peft/tuners/lora.py`` of Ablustrund/LoRAMoE). The experts are split into
  ``num_expert_groups`` contiguous groups; a sequence's importance ``Q[b, e] = sum_t w[b, t, e]`` (its routing
  weights summed over its unpadded tokens) is weighted by ``1 + alpha`` on the experts of the group its task
  favours and ``1 - alpha`` on the others, ``v = Q * I``; the loss is the squared coefficient of variation of all
  ``v`` entries, ``var(v) / (mean(v)^2 + 1e-10)`` (unbiased variance, as ``torch.var``), times
  ``localized_balance_coef``. LoRAMoE's two task types map with ``num_expert_groups=2`` and
  ``task_expert_groups=[1, 0]`` (type 1, world knowledge, favours the first half of the experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .context import call_state, padding_mask_for
from .losses import balance_from_stats, router_stats, z_from_stats
from .router import Gates, check_ids_in_range

if TYPE_CHECKING:
    from .config import ILoraConfig

EXTRA_STATS = 4
_CV_EPS = 1e-10  # LoRAMoE's cv_squared epsilon


# Every ILoraConfig coefficient of a router loss (a layer with one expert has all of them at 0).
COEFFICIENTS = ("balance_loss_coef", "router_z_loss_coef", "router_entropy_coef", "localized_balance_coef")


def has_aux_loss(config: ILoraConfig) -> bool:
    """Whether any auxiliary loss of ``config`` is on (so training forwards must keep router statistics). A layer
    with one expert has no routing to regularise: it keeps none, and does not count in ``aux_loss``'s average."""
    return config.num_experts > 1 and any(getattr(config, name) for name in COEFFICIENTS)


def layer_stats(logits: torch.Tensor, gates: Gates, x: torch.Tensor, config: ILoraConfig) -> torch.Tensor:
    """The float32 statistics ``[2E + 3 + EXTRA_STATS]`` of one router call on input ``x [..., d_in]``: those of
    ``router_stats`` followed by ``[entropy_sum, v_sum, v_sq_sum, v_count]`` (zeros for losses that are off).
    Padding tokens (attention mask 0) are left out of every sum."""
    keep = padding_mask_for(x)
    core = router_stats(logits, gates, keep)
    parts = [core]
    if config.router_entropy_coef:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)  # [T]
        # Padding is weighted out, not indexed out (``logits[keep]`` would sync with the host on CUDA).
        parts.append((entropy if keep is None else entropy * keep.to(entropy.dtype)).sum().reshape(1))
    else:
        parts.append(core.new_zeros(1))
    if config.localized_balance_coef:
        parts.append(_localized_sums(gates.to_dense(logits.shape[-1]).float(), x, keep, config))
    else:
        parts.append(core.new_zeros(3))
    return torch.cat(parts)


def _localized_sums(
    weights: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, config: ILoraConfig
) -> torch.Tensor:
    """``[sum v, sum v^2, count]`` of LoRAMoE's weighted importances, from dense routing weights ``[T, E]``."""
    num_experts = weights.shape[-1]
    if keep is not None:
        weights = weights * keep.unsqueeze(-1).to(weights.dtype)
    # One sequence per batch row of a [batch, seq, ...] input; each row of a 2-D input is its own sequence.
    batch = x.shape[0] if x.dim() >= 3 else weights.shape[0]
    importance = weights.reshape(batch, -1, num_experts).sum(1)  # [batch, E]
    favoured = _favoured_groups(batch, config).to(weights.device, non_blocking=True)  # [batch]
    group_of_expert = torch.arange(num_experts, device=weights.device) // (num_experts // config.num_expert_groups)
    alpha = config.localized_balance_alpha
    scale = torch.where(group_of_expert.unsqueeze(0) == favoured.unsqueeze(1), 1.0 + alpha, 1.0 - alpha)
    v = (importance * scale).reshape(-1)
    return torch.stack([v.sum(), v.pow(2).sum(), v.new_tensor(float(v.numel()))])


def _favoured_groups(batch: int, config: ILoraConfig) -> torch.Tensor:
    ids = call_state()[0]
    if ids is None:
        raise ValueError(
            "localized_balance_coef is set (LoRAMoE's localized balancing) but this training forward has no task ids: "
            "pass ilora_task_ids=... (one per batch row) to the model's forward, or use ilora.routing_context"
        )
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise ValueError(f"localized balancing needs one task id per sequence: got {ids.numel()} for {batch}")
    table = config.task_expert_groups
    groups = list(range(config.num_expert_groups)) if table is None else table
    check_ids_in_range(
        ids,
        len(groups),
        lambda got: (
            f"task ids {got} out of range for localized balancing: task_expert_groups maps task ids "
            f"0..{len(groups) - 1} to expert groups"
        ),
    )
    return torch.as_tensor(groups, dtype=torch.long).to(ids.device, non_blocking=True)[ids]


def cv_squared_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """``var(v) / (mean(v)^2 + 1e-10)`` from ``[sum v, sum v^2, n]`` (unbiased variance; 0 when ``n <= 1``)."""
    total, total_sq, n = sums[0], sums[1], sums[2]
    mean = total / n.clamp_min(1.0)
    var = (total_sq - total * mean) / (n - 1).clamp_min(1.0)
    return torch.where(n > 1, var / (mean.pow(2) + _CV_EPS), torch.zeros_like(var))


def weighted_aux_loss(config: ILoraConfig, stats: torch.Tensor) -> torch.Tensor:
    """``config``'s weighted sum of auxiliary losses from one layer's (possibly all-reduced) statistics."""
    core, extra = stats[:-EXTRA_STATS], stats[-EXTRA_STATS:]
    total = config.balance_loss_coef * balance_from_stats(core) + config.router_z_loss_coef * z_from_stats(core)
    if config.router_entropy_coef:
        total = total + config.router_entropy_coef * extra[0] / core[-1].clamp_min(1.0)
    if config.localized_balance_coef:
        total = total + config.localized_balance_coef * cv_squared_from_sums(extra[1:])
    return total


def validate(config: ILoraConfig, bad: Callable[[str, str], ValueError]) -> None:
    """Field checks of the auxiliary losses (called by ``ILoraConfig.__post_init__``)."""
    for name in ("router_entropy_coef", "localized_balance_coef"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise bad(name, f"must be a non-negative number, got {value!r}")
    if not (isinstance(config.localized_balance_alpha, (int, float)) and 0 <= config.localized_balance_alpha < 1):
        raise bad("localized_balance_alpha", f"must be in [0, 1), got {config.localized_balance_alpha!r}")
    groups = config.num_expert_groups
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise bad("num_expert_groups", f"must be a positive integer, got {groups!r}")
    if not config.num_experts_pattern:  # else each module's count is checked when it is adapted (for_module)
        check_expert_groups(config, bad)
    table = config.task_expert_groups
    if table is not None and not (
        isinstance(table, list) and table and all(isinstance(g, int) and 0 <= g < groups for g in table)
    ):
        raise bad("task_expert_groups", f"must list, per task id, an expert group in [0, {groups}), got {table!r}")


def check_expert_groups(config: ILoraConfig, bad: Callable[[str, str], ValueError]) -> None:
    """Refuse ``num_expert_groups`` only where LoRAMoE's localized balancing runs and cannot split the experts:
    the loss is on (``localized_balance_coef > 0``), the module routes (more than one expert) and its expert count is
    not a multiple of the group count. With the loss off, or on a one-expert (plain LoRA) module, the groups are
    unused."""
    groups, experts = config.num_expert_groups, config.num_experts
    if config.localized_balance_coef and experts > 1 and experts % groups:
        raise bad(
            "num_expert_groups",
            f"LoRAMoE's localized balancing (localized_balance_coef={config.localized_balance_coef!r}) splits the "
            f"experts into equal groups, but num_experts={experts} is not a multiple of num_expert_groups={groups}: "
            "use a group count that divides the expert count, or set localized_balance_coef=0",
        )
