"""``transformers.Trainer`` integration: add ILoRA's auxiliary router losses to the training loss."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..losses import aux_loss


def _data_parallel_group() -> torch.distributed.ProcessGroup | None:
    dist = torch.distributed
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


class AuxLossMixin:
    """Mix into any ``Trainer`` subclass: ``compute_loss`` returns the task loss plus ``ilora.aux_loss(model)``.

    Under data parallelism (DDP, FSDP, DeepSpeed) the router losses are those of the global batch. With gradient
    accumulation each micro-batch adds ``aux / steps``, as the task loss does, whichever way the Trainer normalizes it.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        if model.training:
            aux = aux_loss(model, _data_parallel_group()).to(loss.dtype)
            if self._task_loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _task_loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirrors ``Trainer.training_step``: True when it will *not* divide the returned loss by the steps."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None


class ILoraTrainer(AuxLossMixin, Trainer):
    """A ``transformers.Trainer`` that trains ILoRA's load-balance and z losses along with the task loss."""
