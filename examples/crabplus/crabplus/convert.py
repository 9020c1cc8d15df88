"""Load the authors' Crab / Crab+ I-LoRA checkpoints into an ilora PEFT model.

The authors' file is a ``torch.save`` dict (``lora_weights.bin`` / ``finetune_weights.bin``) with, per adapted
linear at module path ``M`` (possibly prefixed ``base_model.model.``)::

    M.lora_A.weight [r, in]    M.lora_B{i}.weight [out, r] (i = 0..N-1)    M.lora_route.weight [N, in]

ilora's saved layout is ``base_model.model.P.ilora_A [1, in, r]``, ``P.ilora_B [N, r, out]``,
``P.ilora_router.weight [N, in]``. ``M`` is mapped onto the target model's module path ``P``: older transformers
named the Omni thinker's parts ``thinker.model.layers``, ``thinker.audio_tower``, ``thinker.visual`` (now
``model.language_model.layers``, ``model.audio_tower``, ``model.visual``), and a bare LLM checkpoint may sit under
``language_model.`` in the modular model.

Nothing is skipped silently: a missing file, a key that cannot be placed, an incomplete module, a shape that does not
match the target, or an adapted module the checkpoint does not cover is an error naming it (the authors' own loader
continues with untrained zero heads when the file is missing).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import torch
from torch import nn

_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B(?P<head>\d+)|lora_route)\.weight$")
_PEFT_PREFIX = "base_model.model."


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
                f"cannot place checkpoint key {key!r}: not an I-LoRA lora_A / lora_B<i> / lora_route weight"
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


def load_authors_checkpoint(peft_model: nn.Module, path: str, adapter: str = "default", strict: bool = True) -> int:
    """Convert the authors' file at ``path`` and load it into ``peft_model``; returns the number of tensors loaded."""
    from peft import set_peft_model_state_dict

    converted = convert_authors_state_dict(load_authors_state_dict(path), peft_model, adapter, strict)
    result = set_peft_model_state_dict(peft_model, converted, adapter_name=adapter)
    if result.unexpected_keys:
        raise ValueError(f"{path}: PEFT did not place converted keys {result.unexpected_keys[:5]}")
    return len(converted)
