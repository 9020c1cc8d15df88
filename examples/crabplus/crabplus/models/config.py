"""The model section of a run config (``ModelConfig``, with its ``ProcessorConfig``), importable without torch.

``crabplus.config`` reads and checks a YAML file against these dataclasses; keeping them free of torch, transformers
and PEFT lets a wrong key or value be refused at once, before the seconds those imports take. Only the checks that
need the adapter's own config (``check_model_config``: ``ILoraConfig`` / ``LoraConfig`` through PEFT) import them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from crabplus.sample import VIDEO_FPS
from crabplus.tasks import SYSTEM_PROMPT

if TYPE_CHECKING:
    from crabplus.models.adapters import AdapterSettings

PartMode = Literal["frozen", "ilora", "full"]
AdapterKind = Literal["ilora", "lora", "none"]
PresetName = Literal["crabplus", "crab"]  # ILoraConfig.crabplus() / .crab()

_DEFAULT_MODES = {
    "omni": {"llm": "ilora", "audio": "ilora", "vision": "ilora"},
    "modular": {"llm": "ilora", "audio": "frozen", "vision": "frozen", "projector": "full"},
}


@dataclass
class ProcessorConfig:
    """Media and prompt settings; the defaults follow Crab+ (224x224 frames, 16 kHz audio, Omni's system prompt)."""

    system_prompt: str = SYSTEM_PROMPT
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    fps: float = VIDEO_FPS
    """Frame rate of ``Sample.frames`` when ``meta["fps"]`` is absent (the authors' Omni processor default, 1.0)."""
    max_audio_seconds: float = 300.0
    """Longer audio is truncated, as Omni's feature extractor does (its 300 s window)."""


@dataclass
class ModelConfig:
    """Everything ``build_model`` needs. ``None`` fields take the paradigm's default (see ``crabplus.models``)."""

    paradigm: Literal["omni", "modular"] = "omni"
    path: str | None = None
    """Local checkpoint directory; ``None`` builds the tiny random model."""
    adapter: AdapterKind = "ilora"
    llm: PartMode | None = None
    audio: PartMode | None = None
    vision: PartMode | None = None
    projector: PartMode | None = None
    """Modular only: ``"frozen"`` or ``"full"``."""
    preset: PresetName | None = None
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


def adapter_settings(cfg: ModelConfig) -> AdapterSettings:
    """The adapter part of ``cfg``, with the paradigm's default preset filled in."""
    from crabplus.models.adapters import AdapterSettings

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
    ``LoraConfig``, which imports torch and PEFT). Raises ``ValueError`` naming the config key
    (``model.num_experts: ...``)."""
    from crabplus.models import model_parts
    from crabplus.models.adapters import peft_config_for

    try:
        peft_config_for(model_parts(cfg.paradigm), cfg.modes(), cfg.adapter, adapter_settings(cfg))
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if found := _CONFIG_FIELD.match(text):
            name = found.group(1)
            key = f"model.{name}" if name in ModelConfig.__dataclass_fields__ else f"model.ilora_extra.{name}"
            raise ValueError(f"{key}: {text[found.end() :]}") from None
        raise ValueError(f"model: {text.removeprefix('ModelConfig.')}") from None
