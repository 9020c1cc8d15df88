"""Per-part trainability through PEFT: which parts get the adapter, which train fully, which stay frozen.

A model is split into named parts (LLM, audio tower, vision tower, projectors), each a module-path prefix. A part's
mode is ``"frozen"``, ``"ilora"`` (the part gets the run's adapter: I-LoRA, or plain LoRA for the baseline) or
``"full"``. Adapter parts restrict the authors' suffix targets with ``exclude_modules``; full parts go to
``modules_to_save`` so that ``save_pretrained`` writes what was trained.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import get_args

from peft import LoraConfig
from torch import nn

import ilora

from .config import AdapterKind, PartMode, PresetName

PART_MODES: tuple[str, ...] = get_args(PartMode)


@dataclass(frozen=True)
class Part:
    """One trainable unit: module paths starting with one of ``prefixes``; ``save_names`` go to modules_to_save."""

    name: str
    prefixes: tuple[str, ...]
    save_names: tuple[str, ...]
    modes: tuple[str, ...] = PART_MODES


# The language model's vocabulary layers, as PEFT's modules_to_save matches them (by name suffix), in both paradigms.
VOCAB_MODULES = ("embed_tokens", "lm_head")


@dataclass
class AdapterSettings:
    """Adapter hyperparameters; ``None`` keeps the preset's value (``ilora.presets.crabplus`` / ``crab``: targets,
    r, alpha, dropout, experts)."""

    preset: PresetName = "crabplus"
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    num_experts: int | None = None
    extra: dict = field(default_factory=dict)
    """Further ``ILoraConfig`` fields (e.g. ``routing="topk"``); refused for plain LoRA."""
    train_vocab: bool = False
    """Also train the language model's token embedding and output head (PEFT ``modules_to_save``)."""


def _check_modes(parts: tuple[Part, ...], modes: Mapping[str, str]) -> None:
    known = {p.name for p in parts}
    if unknown := set(modes) - known:
        raise ValueError(f"unknown model part(s) {sorted(unknown)}; this model has {sorted(known)}")
    for p in parts:
        if modes[p.name] not in p.modes:
            raise ValueError(f"part {p.name!r}: mode {modes[p.name]!r} is not one of {list(p.modes)}")


def _prefix_regex(parts: list[Part]) -> str:
    alternatives = "|".join(re.escape(prefix) for p in parts for prefix in p.prefixes)
    return rf"(?:{alternatives})(?:\..*)?"


def peft_config_for(parts: tuple[Part, ...], modes: Mapping[str, str], adapter: AdapterKind, settings: AdapterSettings):
    """The PEFT config realizing ``modes`` (``None`` for ``adapter="none"``)."""
    _check_modes(parts, modes)
    adapted = [p for p in parts if modes[p.name] == "ilora"]
    if adapter == "none":
        if settings.train_vocab:
            raise ValueError("model.train_vocab needs an adapter (with adapter 'none', set llm: full)")
        if adapted:
            raise ValueError(f"adapter='none' but part(s) {[p.name for p in adapted]} are set to 'ilora'")
        return None
    if not adapted:
        raise ValueError(f"adapter={adapter!r} but no part is set to 'ilora'; use adapter='none'")
    others = [p for p in parts if modes[p.name] != "ilora"]
    exclude = _prefix_regex(others) if others else None
    to_save = [n for p in parts if modes[p.name] == "full" for n in p.save_names]
    if settings.train_vocab:
        to_save += [n for n in VOCAB_MODULES if n not in to_save]
    to_save = to_save or None
    hyper = dict(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                 num_experts=settings.num_experts)  # fmt: skip
    hyper = {k: v for k, v in hyper.items() if v is not None}
    if adapter not in ("ilora", "lora"):
        raise ValueError(f"adapter must be 'ilora', 'lora' or 'none', got {adapter!r}")
    if adapter == "lora" and (settings.extra or "num_experts" in hyper):
        raise ValueError("plain LoRA takes r, lora_alpha and lora_dropout only (got num_experts or extra fields)")
    # The preset's record (targets and numbers from ilora), restricted to the adapted parts.
    preset = getattr(ilora.ILoraConfig, settings.preset)
    config = preset(exclude_modules=exclude, modules_to_save=to_save, **hyper, **settings.extra)
    return config if adapter == "ilora" else lora_baseline(config)


def lora_baseline(config: ilora.ILoraConfig) -> LoraConfig:
    """The plain-LoRA baseline of ``config``: a ``LoraConfig`` with every field the two configs share taken from it
    (r, alpha, dropout, rsLoRA, rank and alpha patterns, targets, exclusions, modules_to_save, ...), so the baseline
    differs from the routed adapter only by the routing; PEFT's own fields (type, version) stay LoRA's."""
    own = {"peft_type", "peft_version", "auto_mapping"}
    shared = {f.name for f in dataclasses.fields(LoraConfig)} & {f.name for f in dataclasses.fields(config)} - own
    return LoraConfig(**{name: getattr(config, name) for name in sorted(shared)})


def apply_trainability(
    model: nn.Module,
    parts: tuple[Part, ...],
    modes: Mapping[str, str],
    adapter: AdapterKind,
    settings: AdapterSettings,
) -> nn.Module:
    """Wrap ``model`` with the adapter (PEFT) or, for ``adapter="none"``, set ``requires_grad`` per part."""
    cfg = peft_config_for(parts, modes, adapter, settings)
    if cfg is not None:
        from peft import get_peft_model

        return get_peft_model(model, cfg)
    model.requires_grad_(False)
    for p in parts:
        if modes[p.name] == "full":
            for name, param in model.named_parameters():
                if any(name == pre or name.startswith(pre + ".") for pre in p.prefixes):
                    param.requires_grad_(True)
    return model


def part_of(name: str, parts: tuple[Part, ...]) -> str | None:
    """The part a (possibly PEFT-wrapped) parameter name belongs to, or ``None``."""
    name = name.removeprefix("base_model.model.")
    for p in parts:
        for pre in p.prefixes:
            if name == pre or name.startswith(pre + "."):
                return p.name
    return None
