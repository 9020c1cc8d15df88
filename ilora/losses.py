"""Auxiliary router losses (load balance, z-loss) and ``aux_loss``, which collects them from a whole model.

A routed layer keeps, per training forward, its router statistics as *sums over tokens* (``router_stats``); the losses
are computed from them only in ``aux_loss``. Sums add across data-parallel ranks, so with ``group=`` the losses are
those of the global batch, not a mean of per-rank losses: one all-reduce for the whole model.
``aux_loss`` sums ``coef * loss`` per adapter and averages over routed layers, so a coefficient means the same at any
depth. A training call of an ILoRA model with labels adds it to the output's loss itself (``ILoraModel``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .context import CompiledVisibleVar
from .router import Gates, no_autocast


def router_stats(logits: torch.Tensor, gates: Gates, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Sufficient statistics of one router call, a float32 vector ``[2E + 3]``.

    ``[prob_sum (E), share_sum (E), share_count, logsumexp_sq_sum, tokens]``: the share is the router probability
    itself for soft routing and the expert assignments for top-k (a count, without gradient; a slot of weight 0, as
    dynamic top-p routing leaves, is no assignment). ``keep`` (bool
    ``[T]``) leaves tokens out, padding in particular: otherwise how a batch is padded, which differs with how it
    is split over ranks, would change the losses.
    """
    indices, weights = gates.indices, gates.weights
    with no_autocast(logits.device):
        logits = logits.float()
        num_experts = logits.shape[-1]
        # Padding is weighted out rather than indexed out: boolean indexing would sync with the host on CUDA.
        kept = logits.new_ones(logits.shape[0]) if keep is None else keep.to(logits.dtype)
        prob_sum = (torch.softmax(logits, dim=-1) * kept.unsqueeze(-1)).sum(0)
        tokens = kept.sum().reshape(1)
        if indices is None:
            share_sum, share_count = prob_sum, tokens
        else:
            assert weights is not None
            # A zero-weight slot (top-p's padding to k) is no assignment. scatter_add_, unlike bincount, needs no
            # host sync on CUDA.
            used = ((weights != 0).to(kept.dtype) * kept.unsqueeze(-1)).reshape(-1)
            share_sum = prob_sum.new_zeros(num_experts).scatter_add_(0, indices.reshape(-1), used)
            share_count = used.sum().reshape(1)
        lse_sq_sum = (torch.logsumexp(logits, dim=-1).pow(2) * kept).sum().reshape(1)
        return torch.cat([prob_sum, share_sum, share_count, lse_sq_sum, tokens])


def balance_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e``: P the mean router probability, f the share of assignments (top-k) or P (soft).

    Equals 1 at perfectly uniform usage and grows as routing collapses onto few experts.
    """
    num_experts = (stats.numel() - 3) // 2
    probs = stats[:num_experts] / stats[-1].clamp_min(1.0)
    share = stats[num_experts : 2 * num_experts] / stats[-3].clamp_min(1.0)
    return num_experts * (share * probs).sum()


def z_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: the mean squared log-partition, keeps logits small."""
    return stats[-2] / stats[-1].clamp_min(1.0)


def balance_loss(logits: torch.Tensor, gates: Gates) -> torch.Tensor:
    """The load-balance loss of one router call (see ``balance_from_stats``)."""
    return balance_from_stats(router_stats(logits, gates))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The z-loss of one router call's logits ``[T, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def _all_reduce_stats(
    stats: list[torch.Tensor], group: torch.distributed.ProcessGroup, device: torch.device
) -> list[torch.Tensor]:
    import torch.distributed as dist

    flat = torch.cat(stats) if stats else torch.zeros(0, device=device)
    # A layer that ran on some ranks only would pair different statistics (or hang); one scalar collective tells.
    sizes = flat.new_tensor([flat.numel(), -flat.numel()])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    if int(sizes[0]) != -int(sizes[1]):
        raise RuntimeError(
            f"aux_loss: routed layers differ across ranks ({flat.numel()} router statistics here, between "
            f"{-int(sizes[1])} and {int(sizes[0])} elsewhere); every rank must run the same routed layers"
        )
    if not stats:
        return []
    total = flat.detach().clone()
    dist.all_reduce(total, group=group)
    # Value: the global sums. Gradient: `world` times this rank's own share, so the data-parallel average over ranks
    # is exactly the gradient of the global-batch loss. No collective runs in backward, where its place among DDP's
    # or FSDP's gradient reductions could differ between ranks (top-k graphs depend on the data) and deadlock.
    flat = total + dist.get_world_size(group) * (flat - flat.detach())
    return list(flat.split([s.numel() for s in stats]))


def _check_trainable(layer: nn.Module, name: str, stats: torch.Tensor) -> None:
    # Statistics without a graph while a router trains: adding the loss would silently leave routers untrained.
    router_trains = any(p.requires_grad for p in layer.ilora_router[name].parameters())
    if torch.is_grad_enabled() and router_trains and not stats.requires_grad:
        raise RuntimeError(
            f"aux_loss: the router statistics of {layer.ilora_name or 'an ilora layer'} (adapter {name!r}) were "
            "computed without autograd, so the auxiliary losses cannot train the routers. The training forward ran "
            "under torch.no_grad() or under reentrant activation checkpointing (use_reentrant=True), which runs "
            "layers without a graph: enable checkpointing with use_reentrant=False, e.g. "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}); to only "
            "read the value, call aux_loss under torch.no_grad()"
        )


_reads = 0  # calls of aux_loss so far: ILoraModel warns once when a training call's statistics are never read
_caller_adds = CompiledVisibleVar("ilora_caller_adds_aux_loss", False)  # read inside compiled models too


@contextlib.contextmanager
def caller_adds_aux_loss() -> Iterator[None]:
    """While active, training calls with labels leave the router losses out of the model's loss, because the caller
    adds ``aux_loss`` itself (``ilora.integrations.transformers.AuxLossMixin`` does)."""
    token = _caller_adds.set(True)
    try:
        yield
    finally:
        _caller_adds.reset(token)


def caller_adds() -> bool:
    """Whether the current call is inside ``caller_adds_aux_loss``."""
    return _caller_adds.get()


def aux_loss_reads() -> int:
    """How many times ``aux_loss`` has been called in this process."""
    return _reads


def data_parallel_group() -> torch.distributed.ProcessGroup | None:
    """The group ``aux_loss`` reduces over when called for a training step: every rank, when there are several."""
    dist = torch.distributed
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def label_share(
    model: nn.Module,
    labels: torch.Tensor,
    shift_labels: torch.Tensor | None,
    num_items_in_batch: Any,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor | float:
    """The weight of one call's router losses when its task loss is normalized by ``num_items_in_batch``, the label
    count of a whole accumulated batch (``transformers.Trainer``): that call's share of the batch's label tokens.

    The count follows the Trainer's rule (``shift_labels``, else ``labels[..., 1:]`` for causal-LM losses, else
    ``labels``). Under data parallelism both counts are summed over ``group``, so every rank gives the term the same
    weight (what ``aux_loss``'s global-batch gradient needs); whether the Trainer counts tokens per rank or over all
    ranks (``average_tokens_across_devices``, where it then multiplies the loss by the rank count) the accumulated
    calls then add the term once. 1 when ``num_items_in_batch`` is None (the loss is this call's own mean).
    """
    if num_items_in_batch is None:
        return 1.0
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    shifts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )
    counted = shift_labels if shift_labels is not None else labels[..., 1:] if shifts else labels
    counts = torch.stack([counted.ne(-100).sum(), torch.as_tensor(num_items_in_batch, device=counted.device).sum()])
    counts = counts.double() if counts.device.type == "cpu" else counts.float()
    if group is not None:
        torch.distributed.all_reduce(counts, group=group)
    return (counts[0] / counts[1].clamp_min(1)).float()


def aux_loss(model: nn.Module, group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """The weighted auxiliary router losses of the last training forward of ``model`` (0 when none are set).

    ``group`` (e.g. ``torch.distributed.group.WORLD``): compute the losses over the batch of every rank of the group,
    with one all-reduce; every rank must call it, and the gradients must then be averaged over the group (as DDP,
    FSDP and DeepSpeed do). Without it, each rank's loss covers its own tokens. Padding tokens never count.

    Raises ``RuntimeError`` when called with autograd enabled after a training forward that ran without a graph
    (reentrant activation checkpointing, ``use_reentrant=True``, or ``torch.no_grad()``): the loss could not train
    the routers. Under ``torch.no_grad()`` it returns the value.
    """
    from .aux_losses import weighted_aux_loss
    from .layer import ILoraLayer

    global _reads
    _reads += 1
    configs = []
    stats: list[torch.Tensor] = []
    layers = 0
    for module in model.modules():
        if not isinstance(module, ILoraLayer) or not module.aux_stats:
            continue
        layers += 1
        for name, layer_stats in module.aux_stats.items():
            _check_trainable(module, name, layer_stats)
            module.aux_stats_read.add(name)
            configs.append(module.ilora_config[name])
            stats.append(layer_stats)
    device = stats[0].device if stats else next(model.parameters()).device
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        stats = _all_reduce_stats(stats, group, device)
    if not stats:
        return torch.zeros((), device=device)
    total = sum(weighted_aux_loss(config, s) for config, s in zip(configs, stats, strict=True))
    return total / layers
