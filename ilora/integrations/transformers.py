"""``transformers.Trainer`` integration: add ILoRA's auxiliary router losses to the training loss."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..losses import aux_loss


class AuxLossMixin:
    """Mix into any ``Trainer`` subclass: ``compute_loss`` returns the task loss plus ``ilora.aux_loss(model)``."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        if model.training:
            loss = loss + aux_loss(model).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


class ILoraTrainer(AuxLossMixin, Trainer):
    """A ``transformers.Trainer`` that trains ILoRA's load-balance and z losses along with the task loss."""
