"""``transformers.Trainer`` integration: add ILoRA's auxiliary router losses to the training loss."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..context import ROUTER_INPUTS_KWARG, TASK_IDS_KWARG
from ..losses import aux_loss, caller_adds_aux_loss, data_parallel_group


class AuxLossMixin:
    """Mix into any ``Trainer`` subclass: ``compute_loss`` returns the task loss plus ``ilora.aux_loss(model)``.

    It also keeps the ``ilora_task_ids`` and ``ilora_router_inputs`` dataset columns, which
    ``remove_unused_columns=True`` would drop.
    It works whichever way the Trainer computes its loss (the model's ``loss``, a ``compute_loss_func``, label
    smoothing, TRL's log-probabilities): the model is told to leave the router losses out of its own loss
    (``losses.caller_adds_aux_loss``) and they are added here, once. Under data parallelism (DDP, FSDP, DeepSpeed)
    the router losses are those of the global batch. With gradient accumulation each micro-batch adds
    ``aux / steps``, as the task loss does, whichever way the Trainer normalizes it.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        with caller_adds_aux_loss():
            # return_outputs passed on: TRL's trainers run one more forward for the outputs when asked for them.
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        loss, outputs = result if return_outputs else (result, None)
        if model.training:
            aux = aux_loss(model, data_parallel_group()).to(loss.dtype)
            if self._task_loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps only the model's forward arguments; task ids and router signals reach the
        # layers as keywords the base model's signature does not name.
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns = self._signature_columns  # type: ignore[has-type]
        if columns is not None:
            missing = [c for c in (TASK_IDS_KWARG, ROUTER_INPUTS_KWARG) if c not in columns]
            self._signature_columns = [*columns, *missing]

    def _task_loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirrors ``Trainer.training_step``: True when it will *not* divide the returned loss by the steps."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None


class ILoraTrainer(AuxLossMixin, Trainer):
    """A ``transformers.Trainer`` that trains ILoRA's load-balance and z losses along with the task loss."""
