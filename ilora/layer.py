"""The routed layer: a frozen ``nn.Linear`` plus, per adapter, stacked experts and a router.

The adapter's compute path (PyTorch or Triton, and which op) is chosen and run by ``ilora.paths``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .aux_losses import has_aux_loss, layer_stats
from .config import ILoraConfig
from .context import (
    bind_for_backward,
    call_state,
    current_recorder,
    padding_mask_for,
    recomputing,
    share_group_gates,
    shared_group_gates,
)
from .gates import jitter
from .paths import add_routed_lora
from .quantized import compute_dtype, weight_backend
from .registry import apply_gate, build_router
from .router import Gates, check_finite


class MergeNotSupportedError(ValueError):
    """Raised when a merge would not keep every active adapter applying: an adapter whose update depends on each
    input (it cannot be folded into the base weight), or an active adapter that unloading would drop."""


class ILoraLayer(BaseTunerLayer):
    """State and bookkeeping shared by routed layers (PEFT's ``BaseTunerLayer`` contract)."""

    adapter_layer_names = ("ilora_A", "ilora_B", "ilora_router")
    other_param_names = ("r", "scaling", "ilora_dropout", "ilora_config")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        self.weight_backend = weight_backend(base)  # refuses, by type name, any base ilora cannot merge into
        self.base_layer = base_layer
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.ilora_config: dict[str, ILoraConfig] = {}
        self.ilora_A = nn.ParameterDict()
        self.ilora_B = nn.ParameterDict()
        self.ilora_router = nn.ModuleDict()
        self.ilora_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged: dict[str, _Merged] = {}
        # Router statistics of the last training forward per adapter (``losses.router_stats``), read by ``aux_loss``.
        self.aux_stats: dict[str, torch.Tensor] = {}
        # Adapters whose ``aux_stats`` an ``aux_loss`` call has read since they were stored.
        self.aux_stats_read: set[str] = set()
        self.ilora_name = ""  # module path, set by ILoraModel; used in errors and by the routing recorder
        # Router groups (ILoraConfig.router_groups, see ``link_router_groups``), per adapter: a follower's leader (the
        # layer holding the group's router), a leader's followers' names, and the group's name.
        self.router_leader: dict[str, ILoraLayer] = {}
        self.router_followers: dict[str, list[str]] = {}
        self.router_group: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: ILoraConfig) -> None:
        """Create (or re-create) the experts and router of ``adapter_name``."""
        E, r = config.num_experts, config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.ilora_config[adapter_name] = config
        self.ilora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        a = torch.empty(1 if config.shared_a else E, self.in_features, r)
        b = torch.zeros(E, r, self.out_features)
        # The authors' kaiming-uniform(a=sqrt(5)) on A: bound 1/sqrt(d_in); B zero so the model starts unchanged.
        nn.init.uniform_(a, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if not config.init_lora_weights:
            nn.init.uniform_(b, -1 / math.sqrt(r), 1 / math.sqrt(r))
        self.ilora_A[adapter_name] = nn.Parameter(a)
        self.ilora_B[adapter_name] = nn.Parameter(b)
        self.ilora_router[adapter_name] = build_router(config, self.in_features)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], *args: Any, **kwargs: Any) -> None:
        """PEFT's ``set_adapter``, except that a one-expert adapter's router never trains: its softmax over one
        logit is 1 whatever the weights, so it would hold parameters that never get a gradient (which DDP refuses)."""
        super().set_adapter(adapter_names, *args, **kwargs)
        self._freeze_one_expert_routers()

    if hasattr(BaseTunerLayer, "set_requires_grad"):  # newer peft (0.21; not 0.15)

        def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
            super().set_requires_grad(adapter_names, requires_grad)
            self._freeze_one_expert_routers()

    def _freeze_one_expert_routers(self) -> None:
        for name, router in self.ilora_router.items():
            if self.ilora_config[name].num_experts == 1:
                router.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- merging
    def _fixed_gates(self, adapter_name: str) -> torch.Tensor:
        """Routing weights ``[E]`` that do not depend on the input, or an error explaining why there are none."""
        config = self.ilora_config[adapter_name]
        if config.num_experts == 1:
            return torch.ones(1)
        if config.router == "task":
            ids = call_state()[0]
            if ids is None or ids.numel() != 1:
                raise MergeNotSupportedError(
                    f"adapter {adapter_name!r} routes by task: merging folds in one task's experts, so pass a single "
                    "task id, e.g. model.merge_and_unload(task_id=2) or ilora.routing_context(task_ids=2)"
                )
            router = self.router_of(adapter_name)
            logits = router.task_logits(ids.to(self.ilora_A[adapter_name].device))
            return apply_gate(config, logits, training=False).to_dense(config.num_experts)[0]
        raise MergeNotSupportedError(
            f"adapter {adapter_name!r} uses {config.router} routing: its update depends on each input, so it cannot "
            "be folded into the base weight exactly. Export a lossy plain-LoRA approximation instead with "
            "ilora.export_to_lora(...) (router-averaged or SVD-truncated, error measured), see README 'Export', or "
            "merge only the other adapters with merge_adapter(adapter_names=[...]): this one keeps running beside them."
        )

    def router_of(self, adapter_name: str) -> nn.Module:
        """The router ``adapter_name`` routes this layer with: its own, or its router group leader's."""
        leader = self.router_leader.get(adapter_name)
        return (self if leader is None else leader).ilora_router[adapter_name]

    def get_delta_weight(self, adapter_name: str, gates: torch.Tensor | None = None) -> torch.Tensor:
        """``[d_out, d_in]`` update of the base weight for fixed routing weights (``nn.Linear`` layout), in float32
        (float64 for a float64 adapter), unrounded."""
        g = self._fixed_gates(adapter_name) if gates is None else gates
        A, B = self.ilora_A[adapter_name], self.ilora_B[adapter_name]
        dtype = compute_dtype(B.dtype)
        g = g.to(device=B.device, dtype=dtype)
        A32, B32 = A.to(dtype), B.to(dtype)
        if A.shape[0] == 1:
            delta = A32[0] @ torch.einsum("e,erd->rd", g, B32)
        else:
            delta = torch.einsum("e,eir,erd->id", g, A32, B32)
        return (delta * self.scaling[adapter_name]).T

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight: ``W = round(W0 + delta)``, the sum in float32 and rounded (or, on a
        quantized base, quantized) once. Merging an adapter already merged warns and does nothing, as in PEFT."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.ilora_A]
        base = self.get_base_layer()
        for name in names:
            gates = self._fixed_gates(name)
            config = self.ilora_config[name]
            task_ids = call_state()[0] if config.router == "task" and config.num_experts > 1 else None
            delta = self._delta_like_base(name, gates)
            value = self.weight_backend.read(base) + delta
            if safe_merge and not torch.isfinite(value).all():
                raise ValueError(f"merging adapter {name!r} into {self.ilora_name} produced NaN or inf")
            if self.weight_backend.requantizes:
                warnings.warn(
                    f"merging into a {type(base).__name__} base quantizes the merged weights again: each may move by "
                    "up to half a quantization step from the exact sum (unmerge restores the original exactly)",
                    stacklevel=2,
                )
            saved = self.weight_backend.write(base, value, delta)
            self._merged[name] = _Merged(gates, None if task_ids is None else task_ids.clone(), saved)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo the merges, last first, restoring the base weight bit for bit (see ``ilora.quantized``)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            merged = self._merged.pop(name)
            self.weight_backend.restore(base, self._delta_like_base(name, merged.gates), merged.saved)

    def _delta_like_base(self, name: str, gates: torch.Tensor) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return self.get_delta_weight(name, gates).to(device=weight.device, dtype=compute_dtype(weight.dtype))

    def check_merged_routing(self) -> None:
        """Refuse a call whose task ids differ from those a merged task-routed adapter was folded in for."""
        ids = call_state()[0]
        if ids is None:
            return
        for name in self.merged_adapters:
            folded = self._merged[name].task_ids
            if folded is not None and not torch.equal(ids.to(folded.device).unique(), folded):
                raise ValueError(
                    f"adapter {name!r} is merged for task {folded.item()} in {self.ilora_name}, but this call routes "
                    f"task ids {ids.unique().tolist()}: call unmerge_adapter() first, or merge for the task you run"
                )


@dataclass
class _Merged:
    """What ``unmerge`` needs of one merged adapter: its gates, the task it was folded in for, the backend's record."""

    gates: torch.Tensor
    task_ids: torch.Tensor | None
    saved: Any


class Linear(nn.Module, ILoraLayer):
    """An ``nn.Linear`` with routed LoRA experts."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ILoraConfig, **kwargs: Any) -> None:
        super().__init__()
        ILoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_pre_hook(_refuse_partial_adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.ilora_name or 'ilora layer'} expects inputs of width {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self.check_merged_routing()
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.ilora_A and name not in self.merged_adapters:  # the others run beside the merged ones
                result = self._add_adapter(name, x, result)
        return result

    def _record_routing(self, name: str, x: torch.Tensor, logits: torch.Tensor, gates: Gates) -> None:
        """Hand this call's routing, padding left out, to the recorder and (training) to ``aux_loss``.

        A checkpointed forward recomputed in backward is neither recorded nor stored again, but computes the same
        statistics: non-reentrant checkpointing matches the tensors saved by both runs in order. A training-mode
        forward without autograd (a metrics pass beside the training forward, as TRL's trainers run) leaves unread
        statistics of a forward with autograd in place; otherwise its graph-less statistics are stored, so that
        ``aux_loss`` refuses them (reentrant checkpointing runs the forward that way) instead of training nothing.
        """
        config = self.ilora_config[name]
        recorder, again = current_recorder(), recomputing()
        wants_stats = self.training and has_aux_loss(config)
        keep = padding_mask_for(x) if wants_stats or recorder is not None else None
        if recorder is not None and not again:
            with torch.no_grad():
                recorder.add(self.ilora_name, gates.to_dense(config.num_experts), keep)
        if wants_stats:
            stats = layer_stats(logits, gates, x, config)
            if not again and not self._keeps_unread_stats(name, stats):
                self.aux_stats[name] = stats
                self.aux_stats_read.discard(name)
                bind_for_backward(stats)
        elif not again:
            self.aux_stats.pop(name, None)

    def _keeps_unread_stats(self, name: str, stats: torch.Tensor) -> bool:
        held = self.aux_stats.get(name)
        return not stats.requires_grad and held is not None and held.requires_grad and name not in self.aux_stats_read

    def _route(self, name: str, x: torch.Tensor) -> Gates:
        """This call's gates of adapter ``name``: from its router, or, in a router group's follower, its leader's."""
        leader = self.router_leader.get(name)
        if leader is not None:
            return self._follow(name, leader, x)
        config = self.ilora_config[name]
        logits = self.ilora_router[name](jitter(x, config.router_jitter_noise, self.training))
        if config.check_router_logits and not torch.compiler.is_compiling():
            check_finite(logits, self.ilora_name)
        gates = apply_gate(config, logits, self.training)
        self._record_routing(name, x, logits, gates)
        if name in self.router_followers:
            share_group_gates((id(self), name), (x.shape[:-1], gates))
        return gates

    def _follow(self, name: str, leader: ILoraLayer, x: torch.Tensor) -> Gates:
        """The gates the group's leader computed in this call (its statistics and recording stand for the group)."""
        group = f"router group {self.router_group[name]!r} of adapter {name!r}"
        shared = shared_group_gates((id(leader), name))
        if shared is None:
            raise RuntimeError(
                f"{group}: {self.ilora_name} ran before {leader.ilora_name}, whose router it shares, in this call (or "
                "outside a call of the PEFT model): list the group's modules in the order the block calls them, so "
                "that the first one runs first, and call the model, not the layer alone"
            )
        tokens, gates = shared
        if tokens != x.shape[:-1]:
            raise ValueError(
                f"{group}: {self.ilora_name} got an input of shape {tuple(x.shape)}, {math.prod(x.shape[:-1])} tokens, "
                f"but its leader {leader.ilora_name} routed tokens of shape {tuple(tokens)} in this call: a group's "
                "modules must see the same tokens (not, say, cross-attention's keys over another sequence); leave this "
                "module out of the group"
            )
        return gates

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        config = self.ilora_config[name]
        A, B = self.ilora_A[name], self.ilora_B[name]
        gates = self._route(name, x)

        if config.dropout_per_expert and config.lora_dropout and self.training:
            x2 = self._per_expert_dropout(name, x)
        else:
            x2 = self.ilora_dropout[name](x).reshape(-1, self.in_features)
        return add_routed_lora(config, x2, A, B, gates, self.scaling[name], result)

    def _per_expert_dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Crab's layer while training: every expert reads ``x`` through its own dropout mask (its loop calls
        ``lora_B{i}(lora_A(lora_dropout(x)))`` per head), so the shrink runs once per expert. ``[T, E, d_in]``."""
        config, A = self.ilora_config[name], self.ilora_A[name]
        xs = x.reshape(-1, 1, self.in_features).to(A.dtype).expand(-1, config.num_experts, -1).contiguous()
        return self.ilora_dropout[name](xs)

    def __repr__(self) -> str:
        return "ilora." + super().__repr__()


def _refuse_partial_adapter(module: ILoraLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """A checkpoint holding only some of an adapter's tensors (say, no router) would load silently half-trained."""
    for name in module.ilora_A:
        router = module.ilora_router[name] if name in module.ilora_router else nn.Module()  # a group's follower: none
        router_keys = [f"{prefix}ilora_router.{name}.{k}" for k in router.state_dict()]
        keys = (f"{prefix}ilora_A.{name}", f"{prefix}ilora_B.{name}", *router_keys)
        missing = [k for k in keys if k not in state_dict]
        if missing and len(missing) < len(keys):
            raise KeyError(
                f"checkpoint of ilora adapter {name!r} for {module.ilora_name} is incomplete: missing {missing}"
            )


def group_member(path: str, groups: dict[str, list[str]]) -> tuple[str, int, str] | None:
    """``(group, member index, block prefix)`` of the module at ``path`` in ``ILoraConfig.router_groups``: a member
    matches a path equal to it or ending in ``"." + member``; the prefix is the path before it. ``ValueError`` when
    two members match one path."""
    found = [
        (group, i, path[: len(path) - len(member)].rstrip("."))
        for group, members in groups.items()
        for i, member in enumerate(members)
        if path == member or path.endswith("." + member)
    ]
    if len(found) > 1:
        raise ValueError(f"ILoraConfig.router_groups: module {path!r} matches several members {found}; name it once")
    return found[0] if found else None


def link_router_groups(layers: list[ILoraLayer], adapter_name: str, groups: dict[str, list[str]] | None) -> None:
    """Make the layers of each router group in each block (same path prefix) share one router for ``adapter_name``.

    The group's first member (in ``router_groups`` order) among the adapted modules of a block is the leader: it
    keeps its router (the only ``ilora_router.<adapter>`` entry of the group in the state dict); each other member (a
    follower) has its router removed and reuses the leader's gates of the same call. ``ValueError`` for a member
    that matches no adapted module, or members of one group with different expert counts or ``top_k``.
    """
    blocks: dict[tuple[str, str], list[tuple[int, ILoraLayer]]] = {}
    matched: set[tuple[str, int]] = set()
    for layer in layers:
        for role in (layer.router_leader, layer.router_followers, layer.router_group):
            role.pop(adapter_name, None)
        member = group_member(layer.ilora_name, groups or {}) if adapter_name in layer.ilora_A else None
        if member is not None:
            group, index, prefix = member
            matched.add((group, index))
            blocks.setdefault((group, prefix), []).append((index, layer))
    unmatched = [m for g, ms in (groups or {}).items() for i, m in enumerate(ms) if (g, i) not in matched]
    if unmatched:
        raise ValueError(f"ILoraConfig.router_groups: members {unmatched} match no adapted module of this model: "
                         "name modules adapted by target_modules (module name or path suffix)")  # fmt: skip
    _refuse_groups_sharing_nothing(blocks, groups or {})
    for (group, _), members in blocks.items():
        (_, leader), *followers = sorted(members, key=lambda pair: pair[0])
        config = leader.ilora_config[adapter_name]
        leader.router_group[adapter_name] = group
        leader.router_followers[adapter_name] = [f.ilora_name for _, f in followers]
        for _, follower in followers:
            other = follower.ilora_config[adapter_name]
            if (other.num_experts, other.top_k) != (config.num_experts, config.top_k):
                raise ValueError(
                    f"ILoraConfig.router_groups: group {group!r} shares one router between {leader.ilora_name} "
                    f"({config.num_experts} experts, top_k {config.top_k}) and {follower.ilora_name} "
                    f"({other.num_experts}, top_k {other.top_k}): give a group's modules the same expert counts"
                )
            follower.router_leader[adapter_name] = leader
            follower.router_group[adapter_name] = group
            if adapter_name in follower.ilora_router:
                del follower.ilora_router[adapter_name]


def _refuse_groups_sharing_nothing(blocks: dict[tuple[str, str], list], groups: dict[str, list[str]]) -> None:
    """A group of several members none of which ever sit in one block would silently leave every module its own
    router: refused, naming where its members were found."""
    for group, members in groups.items():
        found = [(prefix, len(layers)) for (name, prefix), layers in blocks.items() if name == group]
        if len(members) > 1 and found and all(count == 1 for _, count in found):
            raise ValueError(
                f"ILoraConfig.router_groups: the members {members} of group {group!r} never sit in the same block "
                f"(they were found under {sorted(prefix for prefix, _ in found)[:4]}), so no router would be shared: "
                "a group shares one router among modules of one parent block, e.g. the q/k/v projections of one "
                "attention layer"
            )
