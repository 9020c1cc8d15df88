"""Model builders of both paradigms the paper covers, behind one entry point.

    from crabplus.models import ModelConfig, build_model

    model, processor = build_model(ModelConfig(paradigm="omni"))                 # tiny random thinker + I-LoRA
    model, processor = build_model(ModelConfig(paradigm="omni", path="/ckpt/Qwen2.5-Omni-7B", dtype="bfloat16"))
    model, processor = build_model(ModelConfig(paradigm="modular", path="/ckpt/crab", r=8))
    batch = processor.collate([processor(sample) for sample in samples])
    loss = model(**batch).loss

- ``paradigm="omni"`` (Crab+): the Qwen2.5-Omni thinker; parts ``llm``, ``audio``, ``vision``; I-LoRA preset
  ``crabplus`` on all three by default (the authors' suffix targets on the whole thinker).
- ``paradigm="modular"`` (Crab): CLIP/SigLIP + Whisper encoder -> Q-Former projectors -> causal LM; parts ``llm``,
  ``audio``, ``vision``, ``projector``; default: I-LoRA preset ``crab`` on the LLM, encoders frozen, projectors full.
  ``path`` holds ``vision/``, ``audio/``, ``llm/`` (each a transformers checkpoint; the tokenizer in ``llm/``).
- ``path=None`` builds a tiny random model (well under a million parameters) and a tiny local tokenizer.
- A part's mode is ``"frozen"``, ``"ilora"`` (gets the adapter named by ``adapter``: I-LoRA, or plain PEFT LoRA with
  the same targets and preset hyperparameters for the baseline) or ``"full"`` (trained whole, saved through PEFT's
  ``modules_to_save``). ``adapter="none"`` leaves the model unwrapped and only sets ``requires_grad`` per part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..processor import ChatProcessor, ModularProcessor, OmniProcessor, ProcessorConfig
from .adapters import AdapterKind, AdapterSettings, Part, PartMode, apply_trainability, part_of, peft_config_for
from .modular import MODULAR_PARTS, CrabModularModel, build_tiny_modular, load_modular
from .omni import OMNI_PARTS, build_tiny_omni, load_omni

__all__ = [
    "MODULAR_PARTS",
    "OMNI_PARTS",
    "CrabModularModel",
    "ModelConfig",
    "build_model",
    "check_model_config",
    "model_parts",
    "part_of",
]

_DEFAULT_MODES = {
    "omni": {"llm": "ilora", "audio": "ilora", "vision": "ilora"},
    "modular": {"llm": "ilora", "audio": "frozen", "vision": "frozen", "projector": "full"},
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Everything ``build_model`` needs. ``None`` fields take the paradigm's default (see the module docstring)."""

    paradigm: Literal["omni", "modular"] = "omni"
    path: str | None = None
    """Local checkpoint directory; ``None`` builds the tiny random model."""
    adapter: AdapterKind = "ilora"
    llm: PartMode | None = None
    audio: PartMode | None = None
    vision: PartMode | None = None
    projector: PartMode | None = None
    """Modular only: ``"frozen"`` or ``"full"``."""
    preset: Literal["crabplus", "crab"] | None = None
    """Adapter preset; default ``crabplus`` for omni, ``crab`` for modular."""
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    num_experts: int | None = None
    ilora_extra: dict = field(default_factory=dict)
    """Further ``ILoraConfig`` fields, e.g. ``{"routing": "topk", "top_k": 2}``."""
    train_vocab: bool = False
    """Also train the LM's token embedding and output head beside the adapter. For a model without pretraining (the
    tiny random one) a frozen random vocabulary leaves adapters little to learn; keep it off for real checkpoints."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    """Seed of the tiny random model's initialization."""
    num_queries: int = 32
    """Modular, real checkpoints: Q-Former queries per medium (the tiny model uses 4)."""
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)

    def modes(self) -> dict[str, str]:
        if self.paradigm not in _DEFAULT_MODES:
            raise ValueError(f"ModelConfig.paradigm must be 'omni' or 'modular', got {self.paradigm!r}")
        modes = dict(_DEFAULT_MODES[self.paradigm])
        for name in ("llm", "audio", "vision", "projector"):
            value = getattr(self, name)
            if value is None:
                continue
            if name not in modes:
                raise ValueError(f"ModelConfig.{name} does not apply to paradigm {self.paradigm!r}")
            modes[name] = value
        return modes


def model_parts(paradigm: str) -> tuple[Part, ...]:
    """The named parts (module-path prefixes) of a paradigm's model."""
    return {"omni": OMNI_PARTS, "modular": MODULAR_PARTS}[paradigm]


def build_model(cfg: ModelConfig) -> tuple[nn.Module, ChatProcessor]:
    """Build (or load from ``cfg.path``) the model, apply the adapter and per-part trainability, and return it with
    the matching processor. The returned model is a PEFT model unless ``cfg.adapter == "none"``."""
    modes = cfg.modes()
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"ModelConfig.dtype must be one of {list(_DTYPES)}, got {cfg.dtype!r}")
    dtype = _DTYPES[cfg.dtype]
    if cfg.paradigm == "omni":
        model, tokenizer = build_tiny_omni(cfg.seed) if cfg.path is None else load_omni(cfg.path, dtype)
        processor: ChatProcessor = OmniProcessor(tokenizer, model.config, cfg.processor)
    else:
        if cfg.path is None:
            model, tokenizer = build_tiny_modular(cfg.seed)
        else:
            model, tokenizer = load_modular(cfg.path, dtype, num_queries=cfg.num_queries)
        processor = ModularProcessor(tokenizer, model.config, cfg.processor)
    model = model.to(dtype)
    model = apply_trainability(model, model_parts(cfg.paradigm), modes, cfg.adapter, adapter_settings(cfg))
    return model, processor


def adapter_settings(cfg: ModelConfig) -> AdapterSettings:
    """The adapter part of ``cfg``, with the paradigm's default preset filled in."""
    return AdapterSettings(
        preset=cfg.preset or ("crabplus" if cfg.paradigm == "omni" else "crab"),
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        num_experts=cfg.num_experts,
        extra=dict(cfg.ilora_extra),
        train_vocab=cfg.train_vocab,
    )


_CONFIG_FIELD = re.compile(r"^(?:ILoraConfig|LoraConfig)\.(\w+):\s*")


def check_model_config(cfg: ModelConfig) -> None:
    """Validate ``cfg`` without building a model: the part modes and the adapter's PEFT config (``ILoraConfig`` or
    ``LoraConfig``). Raises ``ValueError`` naming the config key (``model.num_experts: ...``)."""
    try:
        peft_config_for(model_parts(cfg.paradigm), cfg.modes(), cfg.adapter, adapter_settings(cfg))
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if found := _CONFIG_FIELD.match(text):
            name = found.group(1)
            key = f"model.{name}" if name in ModelConfig.__dataclass_fields__ else f"model.ilora_extra.{name}"
            raise ValueError(f"{key}: {text[found.end() :]}") from None
        raise ValueError(f"model: {text.removeprefix('ModelConfig.')}") from None
