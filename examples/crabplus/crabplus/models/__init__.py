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

import importlib
import typing
from typing import TYPE_CHECKING, Any

# The config dataclasses import no torch (``crabplus.config`` checks a run's YAML before any heavy import); the
# builders and model classes below load torch, transformers and PEFT on first use.
from .config import AdapterKind, ModelConfig, PartMode, ProcessorConfig, adapter_settings, check_model_config

if TYPE_CHECKING:
    from torch import nn

    from ..processor import ChatProcessor
    from .adapters import Part

__all__ = [
    "MODULAR_PARTS",
    "OMNI_PARTS",
    "AdapterKind",
    "CrabModularModel",
    "ModelConfig",
    "PartMode",
    "ProcessorConfig",
    "adapter_settings",
    "build_model",
    "check_model_config",
    "model_parts",
    "part_of",
    "peft_config_for",
]

_LAZY = {"MODULAR_PARTS": ".modular", "CrabModularModel": ".modular", "OMNI_PARTS": ".omni", "part_of": ".adapters",
         "peft_config_for": ".adapters"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_parts(paradigm: str) -> tuple[Part, ...]:
    """The named parts (module-path prefixes) of a paradigm's model."""
    from .modular import MODULAR_PARTS
    from .omni import OMNI_PARTS

    return {"omni": OMNI_PARTS, "modular": MODULAR_PARTS}[paradigm]


def build_model(cfg: ModelConfig) -> tuple[nn.Module, ChatProcessor]:
    """Build (or load from ``cfg.path``) the model, apply the adapter and per-part trainability, and return it with
    the matching processor. The returned model is a PEFT model unless ``cfg.adapter == "none"``."""
    import torch

    from ..processor import ModularProcessor, OmniProcessor
    from .adapters import apply_trainability
    from .modular import build_tiny_modular, load_modular
    from .omni import build_tiny_omni, load_omni

    modes = cfg.modes()
    dtypes = typing.get_args(typing.get_type_hints(ModelConfig)["dtype"])
    if cfg.dtype not in dtypes:
        raise ValueError(f"ModelConfig.dtype must be one of {list(dtypes)}, got {cfg.dtype!r}")
    dtype = getattr(torch, cfg.dtype)
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
