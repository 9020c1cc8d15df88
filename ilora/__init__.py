"""ilora: routed LoRA (a mixture of LoRA experts with a learned router) as a PEFT method.

Importing this package registers the method with PEFT, after which ``peft.get_peft_model(model, ILoraConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for any built-in method.
"""

from . import _peft
from .config import ILoraConfig
from .context import RoutingRecorder, record_routing, routing_context
from .layer import ILoraLayer, Linear, MergeNotSupportedError
from .losses import aux_loss
from .model import ILoraModel, ilora_layers
from .registry import register_gate, register_router

_peft.register(ILoraConfig, ILoraModel)

__all__ = [
    "ILoraConfig",
    "ILoraLayer",
    "ILoraModel",
    "ILoraTrainer",
    "Linear",
    "LoraExport",
    "MergeNotSupportedError",
    "RoutingRecorder",
    "aux_loss",
    "export_to_lora",
    "ilora_layers",
    "record_routing",
    "register_gate",
    "register_router",
    "routing_context",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: they pull in transformers' Trainer and PEFT's LoRA, which plain users never need.
    if name in ("export_to_lora", "LoraExport"):
        from . import export

        return getattr(export, name)
    if name == "ILoraTrainer":
        from .integrations.transformers import ILoraTrainer

        return ILoraTrainer
    raise AttributeError(f"module 'ilora' has no attribute {name!r}")
