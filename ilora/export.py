"""Lossy export of a token- or sequence-routed adapter to plain PEFT LoRA, with its error measured.

Input-dependent routing cannot be folded into a fixed weight. Two approximations replace each layer's router by its
mean routing weights ``g`` over calibration data:

- ``"router_average"``: ``A`` and ``sum_e g_e B_e`` (shared A; rank r) or every ``A_e`` with ``g_e B_e`` (rank E*r).
  Exact for the averaged router.
- ``"svd"``: the best rank-``rank`` approximation of the averaged update ``sum_e g_e A_e B_e``.

The error is measured on a held-out batch against the routed model: ``relative_error`` is
``|y_lora - y_ilora| / |y_ilora - y_base|``, the share of the adapter's effect on the output that the export loses.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .context import record_routing
from .model import ilora_layers


@dataclass
class LoraExport:
    """A plain-LoRA adapter (PEFT's saved layout) approximating an ILoRA one, with its measured error."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    method: str
    relative_error: float | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``."""
        os.makedirs(path, exist_ok=True)
        self.config.save_pretrained(path)
        tmp = os.path.join(path, "adapter_model.safetensors.tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict.items()}, tmp)
        os.replace(tmp, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "export_report.json"), "w") as f:
            json.dump({"method": self.method, "relative_error": self.relative_error, **self.report}, f, indent=2)


def _call(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def export_to_lora(
    model: PeftModel,
    calibration: Iterable[Any],
    heldout: Any,
    method: Literal["router_average", "svd"] = "router_average",
    rank: int | None = None,
    adapter_name: str = "default",
) -> LoraExport:
    """Approximate ``model``'s ILoRA adapter by plain LoRA; ``calibration`` batches set the mean routing.

    Batches are dicts of keyword arguments or single tensors. ``rank`` applies to ``"svd"`` (default: the adapter's r).
    """
    if method not in ("router_average", "svd"):
        raise ValueError(f"method must be 'router_average' or 'svd', got {method!r}")
    layers = [layer for layer in ilora_layers(model) if adapter_name in layer.ilora_A]
    if not layers:
        raise ValueError(f"model has no ilora layers for adapter {adapter_name!r}")
    was_training = model.training
    model.eval()
    with record_routing() as recorder:
        for batch in calibration:
            _call(model, batch)
    usage = recorder.usage()
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer in layers:
        routed_by = layer.router_leader.get(adapter_name, layer).ilora_name  # a router group's leader records for it
        if routed_by not in usage:
            raise ValueError(f"calibration batches never reached {routed_by}: cannot average its router")
        lora_A, lora_B = _layer_to_lora(layer, adapter_name, usage[routed_by], method, rank)
        ranks[layer.ilora_name] = lora_A.shape[0]
        key = f"base_model.model.{layer.ilora_name}"
        state_dict[f"{key}.lora_A.weight"] = lora_A
        state_dict[f"{key}.lora_B.weight"] = lora_B
    # lora_alpha == r makes PEFT's scaling 1: the ILoRA scaling is already folded into B. SVD can give a narrow
    # layer a smaller rank than the others: those go in rank_pattern.
    lora_rank = max(ranks.values())
    odd = {name: k for name, k in ranks.items() if k != lora_rank}
    config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(ranks), rank_pattern=odd,
                        alpha_pattern=odd)  # fmt: skip
    error, report = _measure(model, config, state_dict, heldout, adapter_name)
    model.train(was_training)
    return LoraExport(config, state_dict, method, error, report)


def _layer_to_lora(
    layer: Any, adapter_name: str, gates: torch.Tensor, method: str, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    A = layer.ilora_A[adapter_name].float()
    B = layer.ilora_B[adapter_name].float()
    g = gates.to(B.device, torch.float32)
    s = layer.scaling[adapter_name]
    if method == "svd":
        delta = layer.get_delta_weight(adapter_name, g)  # [out, in]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank or layer.r[adapter_name], S.numel())
        return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()
    if A.shape[0] == 1:
        return A[0].T.contiguous(), (torch.einsum("e,erd->rd", g, B) * s).T.contiguous()
    lora_A = A.permute(0, 2, 1).reshape(-1, A.shape[1])  # [E*r, in]
    lora_B = (B * g[:, None, None] * s).reshape(-1, B.shape[2]).T  # [out, E*r]
    return lora_A.contiguous(), lora_B.contiguous()


def _measure(
    model: PeftModel, config: LoraConfig, state_dict: dict[str, torch.Tensor], heldout: Any, adapter_name: str
) -> tuple[float, dict[str, Any]]:
    y_ilora = _call(model, heldout).float()
    with model.disable_adapter():
        y_base = _call(model, heldout).float()
    base = copy.deepcopy(model).unload()
    lora_model = get_peft_model(base, copy.deepcopy(config))
    result = set_peft_model_state_dict(lora_model, state_dict)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"exported LoRA keys did not load: {result.unexpected_keys[:4]}")
    y_lora = _call(lora_model.eval(), heldout).float()
    effect = (y_ilora - y_base).norm().item()
    err = (y_lora - y_ilora).norm().item()
    relative = err / effect if effect > 0 else 0.0
    return relative, {"adapter_effect_norm": effect, "error_norm": err, "output_norm": y_ilora.norm().item()}
