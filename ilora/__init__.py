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

_peft.register(ILoraConfig, ILoraModel)

__all__ = [
    "ILoraConfig",
    "ILoraLayer",
    "ILoraModel",
    "Linear",
    "MergeNotSupportedError",
    "RoutingRecorder",
    "aux_loss",
    "ilora_layers",
    "record_routing",
    "routing_context",
]
__version__ = "0.1.0"
