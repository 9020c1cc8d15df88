"""Load the authors' Crab / Crab+ I-LoRA checkpoints into an ilora PEFT model.

The authors' file is a ``torch.save`` dict (``lora_weights.bin`` / ``finetune_weights.bin``) with, per adapted
linear at module path ``M`` (possibly prefixed ``base_model.model.``)::

    M.lora_A.weight [r, in]    M.lora_B{i}.weight [out, r] (i = 0..N-1)    M.lora_route.weight [N, in]

ilora's saved layout is ``base_model.model.P.ilora_A [1, in, r]``, ``P.ilora_B [N, r, out]``,
``P.ilora_router.weight [N, in]``. ``M`` is mapped onto the target model's module path ``P``: older transformers
named the Omni thinker's parts ``thinker.model.layers``, ``thinker.audio_tower``, ``thinker.visual`` (now
``model.language_model.layers``, ``model.audio_tower``, ``model.visual``), and a bare LLM checkpoint may sit under
``language_model.`` in the modular model.

Crab (v1) files also hold its projectors (``--save_modules vl_projector,al_projector,lora``, keys
``[base_model.model.]model.vl_projector.*`` / ``al_projector.*``: ``visual_ln``, ``visual_query_tokens``,
``visual_Qformer.bert.*`` (BLIP-2's BERT Q-Former), ``visual_proj.{0,2}``; ``audio_*`` alike). They load into the
modular model's ``vision_projector`` / ``audio_projector`` (``crabplus.models.modular``) where a tensor fits; the
Q-Former's text embeddings, text feed-forward and LM head (unused with queries only), a tensor whose shape differs
(``audio_ln`` is BEATs-wide, our audio encoder is Whisper) and the mask decoder (``seg_module``) are left out and
reported by name in the returned ``ConversionReport`` (and logged). Projector coverage is checked as strictly as LoRA
coverage: a file holding any projector tensor must fill every parameter of the modular model's projectors, or the
load is refused naming the parameters it would leave at their current (e.g. random) values; pass
``allow_partial_projectors=True`` to load anyway, with those parameters listed in ``projectors_not_loaded`` and
logged. A file with no projector tensor (LoRA only) leaves the projectors as they are, and says so in the log.

Nothing is skipped silently: a missing file, a key that cannot be placed, an incomplete module, a shape that does not
match the target, or an adapted module the checkpoint does not cover is an error naming it (the authors' own loader
continues with untrained zero heads when the file is missing); projector tensors that cannot be placed are reported.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B(?P<head>\d+)|lora_route)\.weight$")
_PEFT_PREFIX = "base_model.model."
_PROJECTOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?P<part>vl|al)_projector\.(?P<name>.+)$")
_NO_COUNTERPART = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?P<module>seg_module|mask_encoder)\.")
_OURS = {"vl": ("vision_projector", "visual"), "al": ("audio_projector", "audio")}
_SELF_ATTENTION = re.compile(r"(attention)\.self\.")


@dataclass
class ConversionReport:
    """What ``load_authors_checkpoint`` loaded and what it left out (checkpoint key -> why)."""

    lora_tensors: int = 0
    projector_tensors: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    projectors_not_loaded: list[str] = field(default_factory=list)
    """The modular model's projector parameters (``vision_projector.<...>``) the file did not fill."""


def load_authors_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The authors' ``torch.save`` file, read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"I-LoRA checkpoint not found: {path!r} (refusing to run with untrained adapters)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} is not a dict of tensors (got {type(state).__name__})")
    return state


def _omni_renamed(path: str) -> str:
    path = path.removeprefix("thinker.")
    for old in ("audio_tower", "visual"):
        if path.startswith(old + "."):
            return "model." + path
    if path.startswith("model.") and not re.match(r"model\.(language_model|visual|audio_tower)\.", path):
        return "model.language_model." + path.removeprefix("model.")
    return path


def candidate_paths(module: str) -> list[str]:
    """Module paths in the current transformers layout that an authors' module path may denote, most direct first."""
    module = module.removeprefix(_PEFT_PREFIX)
    out = []
    for cand in (module, _omni_renamed(module), "language_model." + module):
        if cand not in out:
            out.append(cand)
    return out


def _ilora_modules(peft_model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    base = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    found = {name: m for name, m in base.named_modules() if hasattr(m, "ilora_A") and adapter in m.ilora_A}
    if not found:
        raise ValueError(
            f"the target model has no ilora layers for adapter {adapter!r}: wrap it with ILoraConfig first"
        )
    return found


def convert_authors_state_dict(
    state: dict[str, torch.Tensor], peft_model: nn.Module, adapter: str = "default", strict: bool = True
) -> dict[str, torch.Tensor]:
    """The authors' tensors in ilora's saved layout for ``peft_model`` (keys ``base_model.model.<P>.ilora_*``).

    ``strict`` also refuses a checkpoint that leaves some of the model's adapted modules untouched.
    """
    targets = _ilora_modules(peft_model, adapter)
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"cannot place checkpoint key {key!r}: not an I-LoRA lora_A / lora_B<i> / lora_route weight, nor a "
                "Crab projector (vl_projector / al_projector) or mask-decoder (seg_module) tensor"
            )
        hits = [p for p in candidate_paths(match["module"]) if p in targets]
        if not hits:
            raise ValueError(
                f"cannot place checkpoint key {key!r}: none of {candidate_paths(match['module'])} is an adapted "
                "module of the target model"
            )
        path = hits[0]
        if origin.setdefault(path, match["module"]) != match["module"]:
            raise ValueError(f"checkpoint modules {origin[path]!r} and {match['module']!r} both map onto {path!r}")
        grouped[path][match["kind"]] = tensor
    if strict and (uncovered := sorted(set(targets) - set(grouped))):
        raise ValueError(f"checkpoint has no weights for {len(uncovered)} adapted module(s), e.g. {uncovered[:3]}")

    out: dict[str, torch.Tensor] = {}
    for path, parts in grouped.items():
        layer = targets[path]
        heads = sorted(int(k.removeprefix("lora_B")) for k in parts if k.startswith("lora_B"))
        if "lora_A" not in parts or "lora_route" not in parts or heads != list(range(len(heads))) or not heads:
            raise ValueError(
                f"module {origin[path]!r} is incomplete: needs lora_A, lora_B0..lora_B<N-1> and lora_route, "
                f"got {sorted(parts)}"
            )
        converted = {
            "ilora_A": (parts["lora_A"].t().unsqueeze(0), "lora_A"),
            "ilora_B": (torch.stack([parts[f"lora_B{i}"].t() for i in heads]), "lora_B*"),
            "ilora_router.weight": (parts["lora_route"], "lora_route"),
        }
        live = {
            "ilora_A": layer.ilora_A[adapter],
            "ilora_B": layer.ilora_B[adapter],
            "ilora_router.weight": layer.ilora_router[adapter].weight,
        }
        for name, (tensor, source) in converted.items():
            if tensor.shape != live[name].shape:
                raise ValueError(
                    f"shape mismatch for {origin[path]}.{source}: checkpoint gives {tuple(tensor.shape)} in ilora "
                    f"layout ({name}), the target model has {tuple(live[name].shape)}"
                )
            out[f"{_PEFT_PREFIX}{path}.{name}"] = tensor.to(live[name].dtype).contiguous()
    return out


def projector_path(key: str) -> tuple[str | None, str]:
    """The modular model's parameter path for a Crab projector key (``vision_projector.<...>``), or None and why it
    has no counterpart. Raises ``ValueError`` for a key that is not a Crab projector's."""
    match = _PROJECTOR.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a Crab projector key (vl_projector.* / al_projector.*)")
    ours, medium = _OURS[match["part"]]
    name = match["name"]
    bert = f"{medium}_Qformer.bert."
    renames = [
        (f"{medium}_ln.", "feature_norm."),
        (f"{medium}_proj.", "to_lm."),
        (f"{bert}embeddings.LayerNorm.", "qformer.layernorm."),
        (f"{bert}encoder.", "qformer.encoder."),
    ]
    if name == f"{medium}_query_tokens":
        return f"{ours}.query_tokens", ""
    if name.startswith(f"{medium}_Qformer.cls."):
        return None, "the Q-Former's language-model head (unused: the projector reads queries only)"
    if name.startswith(f"{bert}embeddings.") and not name.startswith(f"{bert}embeddings.LayerNorm."):
        return None, "the Q-Former's text embeddings (unused: the projector reads queries only)"
    if re.match(rf"{re.escape(bert)}encoder\.layer\.\d+\.(intermediate|output)\.", name):
        return None, "the Q-Former's text feed-forward (unused: the projector reads queries only)"
    for old, new in renames:
        if name.startswith(old):
            # LAVIS's BERT (Crab's models/Qformer.py) says attention.self.query, transformers attention.attention.query
            path = _SELF_ATTENTION.sub(r"\1.attention.", new + name.removeprefix(old))
            return f"{ours}.{path}", ""
    return None, f"no counterpart of {medium} projector tensor {name!r} in the modular model"


def _projector_targets(model: nn.Module, path: str) -> list[torch.Tensor] | str:
    """The live parameters at ``path`` (every copy under PEFT's modules_to_save), or why there is none."""
    base = model.base_model.model if hasattr(model, "base_model") else model
    module_name, _, param = path.partition(".")
    if not hasattr(base, module_name):
        return f"the target model has no {module_name} (not the modular paradigm)"
    module = getattr(base, module_name)
    copies = [module.original_module, *module.modules_to_save.values()] if hasattr(module, "modules_to_save") else [
        module]  # fmt: skip
    found = [dict(m.named_parameters()).get(param) for m in copies]
    return [p for p in found if p is not None] or f"the modular model has no parameter {path}"


def model_projector_parameters(model: nn.Module) -> list[str]:
    """The paths (``vision_projector.<name>``, ``audio_projector.<name>``) of the model's projector parameters; empty
    for a model without projectors (the Omni paradigm)."""
    base = model.base_model.model if hasattr(model, "base_model") else model
    paths = []
    for ours, _ in _OURS.values():
        module = getattr(base, ours, None)
        module = getattr(module, "original_module", module)
        if module is not None:
            paths += [f"{ours}.{name}" for name, _ in module.named_parameters()]
    return paths


def plan_projectors(
    model: nn.Module, state: dict[str, torch.Tensor], report: ConversionReport
) -> dict[str, tuple[str, torch.Tensor, list[torch.Tensor]]]:
    """``{our path: (checkpoint key, tensor, live copies)}`` for Crab's projector tensors that fit the modular model;
    the rest go to ``report.left_out`` with the reason. Changes nothing in the model."""
    plan: dict[str, tuple[str, torch.Tensor, list[torch.Tensor]]] = {}
    for key, tensor in state.items():
        path, why = projector_path(key)
        targets = _projector_targets(model, path) if path else why
        if isinstance(targets, str):
            report.left_out[key] = targets
        elif tensor.shape != targets[0].shape:
            report.left_out[key] = f"shape {tuple(tensor.shape)} does not fit {path} {tuple(targets[0].shape)}"
        elif path in plan:
            raise ValueError(f"checkpoint keys {plan[path][0]!r} and {key!r} both map onto {path!r}")
        else:
            plan[path] = (key, tensor, targets)
    return plan


def _check_projector_coverage(
    model: nn.Module,
    plan: dict[str, Any],
    projectors: dict[str, torch.Tensor],
    report: ConversionReport,
    allow_partial: bool,
) -> None:
    """Refuse (unless ``allow_partial``) a file with projector tensors that leaves some projector parameter unfilled;
    record and log what stays unfilled."""
    report.projectors_not_loaded = [p for p in model_projector_parameters(model) if p not in plan]
    missing = report.projectors_not_loaded
    if not missing:
        return
    if not projectors:
        log.warning(
            "no projector tensor in the checkpoint: the %d projector parameters keep their values", len(missing)
        )
        return
    names = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
    what = (
        f"the checkpoint holds Crab projector tensors but leaves {len(missing)} projector parameter(s) of the model "
        f"unfilled ({names}; Crab names them {{vl,al}}_projector.*, or their tensors did not fit: see left_out)"
    )
    if not allow_partial:
        raise ValueError(f"{what}; pass allow_partial_projectors=True to load the rest and keep these as they are")
    log.warning("%s; kept as they are (allow_partial_projectors=True)", what)


def load_authors_checkpoint(
    peft_model: nn.Module,
    path: str,
    adapter: str = "default",
    strict: bool = True,
    allow_partial_projectors: bool = False,
) -> ConversionReport:
    """Convert the authors' file at ``path`` and load it into ``peft_model``: the I-LoRA tensors (every one placed,
    or an error), Crab's projectors where they fit; the report names what was left out (also logged).

    A file with projector tensors must fill every projector parameter of the model, else ``ValueError`` naming the
    unfilled ones (before anything is loaded) unless ``allow_partial_projectors``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = load_authors_state_dict(path)
    report = ConversionReport()
    projectors = {k: v for k, v in state.items() if not _KEY.match(k) and _PROJECTOR.match(k)}
    for key in state:
        if (found := _NO_COUNTERPART.match(key)) and not _KEY.match(key):
            report.left_out[key] = f"Crab's {found['module']} (the modular model has no mask decoder)"
    lora = {k: v for k, v in state.items() if k not in projectors and k not in report.left_out}
    converted = convert_authors_state_dict(lora, peft_model, adapter, strict)
    plan = plan_projectors(peft_model, projectors, report)
    _check_projector_coverage(peft_model, plan, projectors, report, allow_partial_projectors)
    with torch.no_grad():
        for key, tensor, targets in plan.values():
            for target in targets:
                target.copy_(tensor.to(target.dtype))
            report.projector_tensors.append(key)
    # PEFT loads an adapter's whole saved state (modules_to_save copies included): the current one, plus the LoRA.
    full = {**get_peft_model_state_dict(peft_model, adapter_name=adapter), **converted}
    result = set_peft_model_state_dict(peft_model, full, adapter_name=adapter)
    if result.unexpected_keys:
        raise ValueError(f"{path}: PEFT did not place converted keys {result.unexpected_keys[:5]}")
    report.lora_tensors = len(converted)
    if report.left_out:
        lines = "\n".join(f"  {k}: {why}" for k, why in report.left_out.items())
        log.warning("%s: %d tensors left out of the model:\n%s", path, len(report.left_out), lines)
    return report
