"""The routed layer: a frozen ``nn.Linear`` plus, per adapter, stacked experts and a router.

The only place that chooses between the PyTorch path (``ilora.functional``) and the Triton kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import functional as F
from .config import ILoraConfig
from .context import STATE, call_state, padding_mask_for
from .losses import router_stats
from .router import build_router, check_finite, gate

# Decode-sized batches go to the per-row (BGMV-style) kernel; beyond this, sorting tokens by expert pays off.
PER_ROW_MAX_TOKENS = 64
# Top-k routing over few, small experts runs the dense kernel with the unselected gates zero: it computes (E - k) * r
# extra rank per token but needs no sort, no atomics and no fp32 [T, d_out] buffer. By rates alone (an H100/H200's
# ~600 TFLOP/s of bf16 GEMM against ~4 TB/s for the sparse path's three fp32 [T, d_out] passes) the dense extra stays
# cheaper up to roughly (E - k) * r = 375; this bound leaves a margin until GPU runs place it.
DENSE_TOPK_MAX_EXTRA_RANK = 256


class MergeNotSupportedError(ValueError):
    """Raised when an adapter's update depends on each input and cannot be folded into the base weight."""


class ILoraLayer(BaseTunerLayer):
    """State and bookkeeping shared by routed layers (PEFT's ``BaseTunerLayer`` contract)."""

    adapter_layer_names = ("ilora_A", "ilora_B", "ilora_router")
    other_param_names = ("r", "scaling", "ilora_dropout", "ilora_config")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"ilora can adapt torch.nn.Linear modules only, got {type(base).__name__}; "
                "narrow target_modules or add this module to exclude_modules"
            )
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
        self._merged_gates: dict[str, torch.Tensor] = {}
        self._aux: dict[str, torch.Tensor] = {}  # router statistics of the last training forward
        self.ilora_name = ""  # module path, set by ILoraModel; used in errors and by the routing recorder

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
        self.ilora_router[adapter_name] = build_router(config.router, self.in_features, E, config.num_tasks)
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
            logits = self.ilora_router[adapter_name].task_logits(ids.to(self.ilora_A[adapter_name].device))
            return gate(logits, config.routing, config.top_k, config.router_temperature).to_dense(config.num_experts)[0]
        raise MergeNotSupportedError(
            f"adapter {adapter_name!r} uses {config.router} routing: its update depends on each input, so it cannot "
            "be folded into the base weight exactly. Export a lossy plain-LoRA approximation instead with "
            "ilora.export_to_lora(...) (router-averaged or SVD-truncated, error measured), see README 'Export'."
        )

    def get_delta_weight(self, adapter_name: str, gates: torch.Tensor | None = None) -> torch.Tensor:
        """``[d_out, d_in]`` update of the base weight for fixed routing weights (``nn.Linear`` layout)."""
        g = self._fixed_gates(adapter_name) if gates is None else gates
        A, B = self.ilora_A[adapter_name], self.ilora_B[adapter_name]
        g = g.to(device=B.device, dtype=torch.float32)
        A32, B32 = A.float(), B.float()
        if A.shape[0] == 1:
            delta = A32[0] @ torch.einsum("e,erd->rd", g, B32)
        else:
            delta = torch.einsum("e,eir,erd->id", g, A32, B32)
        return (delta * self.scaling[adapter_name]).T

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.ilora_A]
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters:
                continue
            gates = self._fixed_gates(name)
            delta = self.get_delta_weight(name, gates).to(base.weight.dtype)
            merged = base.weight.data + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} into {self.ilora_name} produced NaN or inf")
            base.weight.data = merged
            self._merged_gates[name] = gates
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.get_delta_weight(name, self._merged_gates.pop(name))
            base.weight.data -= delta.to(base.weight.dtype)


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
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.ilora_A:
                result = self._add_adapter(name, x, result)
        return result

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        config = self.ilora_config[name]
        A, B = self.ilora_A[name], self.ilora_B[name]
        logits = self.ilora_router[name](x)
        if config.check_router_logits and not torch.compiler.is_compiling():
            check_finite(logits, self.ilora_name)
        gates = gate(logits, config.routing, config.top_k, config.router_temperature)
        if STATE.recorder is not None:
            STATE.recorder.add(self.ilora_name, gates.to_dense(config.num_experts))
        if self.training and (config.balance_loss_coef or config.router_z_loss_coef):
            self._aux[name] = router_stats(logits, gates, padding_mask_for(x))
        else:
            self._aux.pop(name, None)

        x2 = self.ilora_dropout[name](x).reshape(-1, self.in_features).to(A.dtype)
        base2 = result.reshape(-1, self.out_features)
        scaling = self.scaling[name]
        if self._use_triton(config, x2):
            from ilora import kernels

            per_row = gates.dense is None and config.top_k == 1 and x2.shape[0] <= PER_ROW_MAX_TOKENS
            extra_rank = (config.num_experts - config.top_k) * config.r
            if gates.dense is not None or (not per_row and extra_rank <= DENSE_TOPK_MAX_EXTRA_RANK):
                dense = gates.to_dense(config.num_experts).to(A.dtype)
                out = kernels.soft_routed_lora(x2, A, B, dense, scaling, base_out=base2.to(A.dtype))
            elif per_row:
                # One expert per row: fold its weight into the row, (w x) A B = w (x A B).
                w = gates.weights.to(A.dtype)
                out = kernels.per_row_routed_lora(
                    x2 * w, A, B, gates.indices[:, 0], scaling, base_out=base2.to(A.dtype)
                )
            else:
                w, idx = gates.weights.to(A.dtype), gates.indices
                out = kernels.topk_routed_lora(x2, A, B, w, idx, scaling, base_out=base2.to(A.dtype))
            return out.to(result.dtype).view_as(result)
        if gates.dense is not None and base2.dtype == A.dtype:
            out = F.soft_routed_lora(x2, A, B, gates.dense.to(A.dtype), scaling, base_out=base2)
            return out.view_as(result)
        if gates.dense is not None:
            delta = F.soft_routed_lora(x2, A, B, gates.dense.to(A.dtype), scaling)
        else:
            delta = F.topk_routed_lora(x2, A, B, gates.weights.to(A.dtype), gates.indices, scaling)
        return result + delta.to(result.dtype).view_as(result)

    @staticmethod
    def _use_triton(config: ILoraConfig, x: torch.Tensor) -> bool:
        if config.use_kernels == "torch":
            return False
        try:
            from ilora.kernels import triton_runnable
        except ImportError:
            triton_runnable = None
        runnable = triton_runnable is not None and triton_runnable(x)
        if config.use_kernels == "triton" and not runnable:
            raise RuntimeError(
                f"use_kernels='triton' but Triton cannot run on {x.device} tensors here: install triton "
                "(pip install 'ilora[triton]'), use a CUDA device, or set TRITON_INTERPRET=1 for CPU tensors"
            )
        return runnable and (config.use_kernels == "triton" or x.is_cuda)

    def __repr__(self) -> str:
        return "ilora." + super().__repr__()


def _refuse_partial_adapter(module: ILoraLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """A checkpoint holding only some of an adapter's tensors (say, no router) would load silently half-trained."""
    for name in module.ilora_A:
        keys = (f"{prefix}ilora_A.{name}", f"{prefix}ilora_B.{name}", f"{prefix}ilora_router.{name}.weight")
        missing = [k for k in keys if k not in state_dict]
        if missing and len(missing) < len(keys):
            raise KeyError(
                f"checkpoint of ilora adapter {name!r} for {module.ilora_name} is incomplete: missing {missing}"
            )
