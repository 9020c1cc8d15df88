"""TRL's trainers add ILoRA's router losses as they add a Mixture-of-Experts model's load-balancing loss.

TRL (1.16, ``trl/trainer/sft_trainer.py``, ``SFTTrainer.compute_loss``; DPO, GRPO, KTO and RLOO alike) computes the
loss outside the model from the per-token ``log_probs`` of its fused LM head (``trl.trainer.utils.add_fused_lm_head``)
and adds ``router_aux_loss_coef * outputs.aux_loss`` when the model's text config declares ``output_router_logits``
and the coefficient is not 0 (it then sets ``output_router_logits = True``). ``declare_router_loss`` gives a dense
base model's config those two fields (``router_aux_loss_coef = 1.0``: ILoRA's own coefficients are in its
``ILoraConfig``) and ``expose_aux_loss`` puts ILoRA's weighted router losses into the fused output's ``aux_loss``.
Under a coefficient other than 1.0 (a MoE base model's own), the term is divided by it, so TRL adds it exactly.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

OWN_LOSS_FIELD = "output_router_logits"  # transformers' MoE configs: the model returns router logits and aux_loss
COEF_FIELD = "router_aux_loss_coef"
DECLARED_COEF = 1.0


def fused_output(output: Any) -> bool:
    """Whether ``output`` is the fused LM head's (``log_probs`` instead of logits): TRL computes the loss itself."""
    return isinstance(output, dict) and "log_probs" in output


def _declares_router_loss(config_cls: type) -> bool:
    """Whether the config class itself declares ``output_router_logits`` (a MoE model's: a dataclass field in
    transformers >= 5.24, an ``__init__`` argument before); read from the class, not an instance ilora may have set."""
    return hasattr(config_cls, OWN_LOSS_FIELD) or OWN_LOSS_FIELD in inspect.signature(config_cls.__init__).parameters


class DeclaredRouterLoss:
    """Sets ``output_router_logits = False`` and ``router_aux_loss_coef = 1.0`` on a text config that has neither
    (a dense model) until ``remove()``; a config that declares them (a MoE model) is left as it is."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = getattr(model, "config", None)
        get_text_config = getattr(config, "get_text_config", None)
        self.config = get_text_config() if callable(get_text_config) else None
        self.declared = self.config is not None and not _declares_router_loss(type(self.config))
        if self.declared:
            setattr(self.config, OWN_LOSS_FIELD, False)
            setattr(self.config, COEF_FIELD, DECLARED_COEF)

    def before_call(self, kwargs: dict[str, Any]) -> None:
        """Keep the fused head from computing a MoE load-balancing loss for a dense model, whose backbone returns no
        router logits (TRL passes ``output_router_logits=True`` once it has enabled its aux-loss path)."""
        if self.declared and kwargs.get("fused_lm_head"):
            kwargs[OWN_LOSS_FIELD] = False
        elif self.declared:
            kwargs.pop(OWN_LOSS_FIELD, None)

    def trainer_adds_aux_loss(self) -> bool:
        """Whether TRL's trainer adds ``router_aux_loss_coef * outputs.aux_loss`` to the loss it computes."""
        return bool(getattr(self.config, OWN_LOSS_FIELD, False)) and getattr(self.config, COEF_FIELD, 0.0) != 0

    def expose_aux_loss(self, output: Any, term: torch.Tensor | None) -> None:
        """Add ``term`` (ILoRA's weighted router losses of this call, or None) to ``output.aux_loss``, divided by the
        trainer's coefficient; ``aux_loss`` is a tensor (0 when there is nothing to add) whenever TRL reads it.

        Raises ``ValueError`` when the coefficient on a dense model is not 1.0: ILoRA's are ``ILoraConfig``'s.
        """
        if not self.trainer_adds_aux_loss():
            return
        coef = float(getattr(self.config, COEF_FIELD))
        if self.declared and coef != DECLARED_COEF:
            raise ValueError(
                f"router_aux_loss_coef={coef} (TRL's SFTConfig/DPOConfig...) weights a Mixture-of-Experts base "
                "model's own load-balancing loss; this model has none, and ILoRA's router losses are weighted by "
                "ILoraConfig.balance_loss_coef / router_z_loss_coef. Leave router_aux_loss_coef unset (or 1.0) and "
                "set the ILoraConfig coefficients"
            )
        current = output.get("aux_loss")
        logits = output["log_probs"]
        total = logits.new_zeros(()) if current is None else torch.as_tensor(current, device=logits.device)
        if term is not None:
            total = total + (term / coef).to(total.dtype)
        output["aux_loss"] = total

    def remove(self) -> None:
        if self.declared:
            for field in (OWN_LOSS_FIELD, COEF_FIELD):
                if field in self.config.__dict__:
                    delattr(self.config, field)
            self.declared = False
