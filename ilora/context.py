"""Per-forward routing state: task ids, the attention mask, and the opt-in routing recorder.

Routed layers sit deep inside models whose code we do not own, so what a router needs besides its input (task ids,
which tokens are padding) reaches them through this module-level state, set for the duration of one call.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class RoutingRecorder:
    """Routing weights per layer, gathered while ``record_routing`` is active.

    ``weights[layer_name]`` is a list (one entry per forward) of dense ``[tokens, num_experts]`` float32 CPU tensors
    (top-k routing is scattered back to dense, zeros for unselected experts).
    """

    weights: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def add(self, layer_name: str, gates: torch.Tensor) -> None:
        self.weights[layer_name].append(gates.detach().float().cpu())

    def usage(self, group: torch.distributed.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Mean routing weight per expert for each layer, over every recorded token (of every rank of ``group``,
        when given: every rank must call it, having recorded the same layers)."""
        names = sorted(self.weights)
        sums = [torch.cat(self.weights[n]).sum(0) for n in names]
        counts = [float(sum(w.shape[0] for w in self.weights[n])) for n in names]
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            import torch.distributed as dist

            flat = torch.cat([torch.cat(sums), torch.tensor(counts)]) if names else torch.zeros(0)
            sizes = torch.tensor([flat.numel(), -flat.numel()])
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
            if int(sizes[0]) != -int(sizes[1]):
                raise RuntimeError("RoutingRecorder.usage: ranks recorded different routed layers")
            backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            flat = flat.to(backend_device)
            dist.all_reduce(flat, group=group)
            flat = flat.cpu()
            head = flat[: flat.numel() - len(names)]
            sums = list(head.split([s.numel() for s in sums]))
            counts = flat[-len(names) :].tolist() if names else []
        return {n: s / c for n, s, c in zip(names, sums, counts, strict=True)}


@dataclass
class _State:
    task_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    recorder: RoutingRecorder | None = None
    # Sequence routing during cached generation: the decision made on the prompt is kept for the decode steps.
    reuse_sequence_gates: bool = False
    sequence_gates: dict[int, torch.Tensor] = field(default_factory=dict)
    # The last training forward's (task_ids, attention_mask), for its recomputation during backward.
    recompute: tuple[torch.Tensor | None, torch.Tensor | None] | None = None


STATE = _State()


def call_state() -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(task_ids, attention_mask)`` of the call being computed.

    Inside backward that is activation checkpointing recomputing a training forward: it must see that forward's
    state, not whatever the caller's is now, or the recomputed routing (and the saved tensors) would differ. It is
    the *last* training forward's state: with checkpointing, run backward after each forward (as training loops
    and gradient accumulation do), not once after several forwards with different masks or task ids.
    """
    if STATE.recompute is not None and torch._C._current_graph_task_id() != -1:
        return STATE.recompute
    return STATE.task_ids, STATE.attention_mask


# The forward keyword that carries task ids into a model wrapped by PEFT (``model(**batch, ilora_task_ids=ids)``).
TASK_IDS_KWARG = "ilora_task_ids"


def _as_task_tensor(task_ids: int | torch.Tensor | list[int]) -> torch.Tensor:
    t = torch.as_tensor(task_ids)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must be integers, got dtype {t.dtype}")
    return t.reshape(-1).long()


def padding_mask_for(x: torch.Tensor) -> torch.Tensor | None:
    """The current call's attention mask as a bool ``[batch * seq]`` token mask when ``x [batch, seq, d]`` lines up
    with it (the language model's layers); None elsewhere (towers with their own token layout, 2-D inputs)."""
    mask = call_state()[1]
    if mask is None or x.dim() != 3 or mask.shape != x.shape[:2]:
        return None
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


@contextlib.contextmanager
def routing_context(
    task_ids: int | torch.Tensor | list[int] | None = None, attention_mask: torch.Tensor | None = None
) -> Iterator[None]:
    """Give every routed layer the task ids (``[batch]`` or one int for all) and/or attention mask of one call.

    Use it around ``model.generate(...)`` or any call that cannot take a ``task_ids=`` keyword.
    """
    previous = (STATE.task_ids, STATE.attention_mask)
    if task_ids is not None:
        STATE.task_ids = _as_task_tensor(task_ids)
    if attention_mask is not None:
        STATE.attention_mask = attention_mask
    try:
        yield
    finally:
        STATE.task_ids, STATE.attention_mask = previous


@contextlib.contextmanager
def record_routing() -> Iterator[RoutingRecorder]:
    """Record every routed layer's routing weights while active; no cost when not used."""
    previous = STATE.recorder
    STATE.recorder = RoutingRecorder()
    try:
        yield STATE.recorder
    finally:
        STATE.recorder = previous
