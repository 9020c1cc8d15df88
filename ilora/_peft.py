"""Everything that touches PEFT's registries, with the version guards, in one place.

PEFT (>= 0.15) lets a third-party method register itself, but its ``PeftType`` enum is closed: the member has to be
added before ``register_peft_method`` accepts the name. Both steps are idempotent so a re-import is harmless.
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections.abc import Iterator
from typing import Any

import torch
from peft.utils import PeftType

METHOD_NAME = "ilora"
PEFT_TYPE_NAME = "ILORA"
PREFIX = "ilora_"


def ensure_peft_type() -> PeftType:
    """Add ``PeftType.ILORA`` to PEFT's closed enum (once) and return it."""
    existing = PeftType._member_map_.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    if hasattr(enum.Enum, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    # Python >= 3.12 resolves ``PeftType.ILORA`` through the class dict rather than ``_member_map_``.
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def base_tuner_has(name: str) -> bool:
    """True when the installed peft's ``BaseTuner`` implements ``name`` itself (defined there and not abstract).

    ``ILoraModel`` defines a method only where this is False, so each peft release runs its own version.
    """
    from peft.tuners.tuners_utils import BaseTuner

    attr = BaseTuner.__dict__.get(name)
    return attr is not None and not getattr(attr, "__isabstractmethod__", False)


def register(config_cls: type, model_cls: type) -> None:
    """Register the method with PEFT unless an earlier import already did."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise RuntimeError(f"PEFT already has a different method registered as {PEFT_TYPE_NAME!r}")
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


# ------------------------------------------------- peft 0.21's adapter-management rules on older peft (0.15)
def peft_model_has(name: str) -> bool:
    """True when the installed peft's ``PeftModel`` implements ``name`` itself (0.21 has ``delete_adapter`` and
    ``set_requires_grad``; 0.15 has neither: its ``delete_adapter`` is the tuner's, reached through ``__getattr__``)."""
    from peft import PeftModel

    return name in PeftModel.__dict__


def adopt_peft_021_adapter_rules(peft_model: Any, tuner: Any) -> None:
    """Give a ``PeftModel`` of an older peft (0.15) peft 0.21's rules where its own code differs (peft 0.21's
    ``PeftModel.add_adapter``, ``load_adapter`` and ``delete_adapter`` in ``peft/peft_model.py``):

    - ``add_adapter`` and ``load_adapter`` keep every existing parameter's ``requires_grad`` (0.15 made the active
      adapter and its ``modules_to_save`` copies trainable again) and leave the new adapter frozen, unless loaded with
      ``is_trainable=True``, which makes it (and its copies) trainable (0.15 left it frozen);
    - deleting the active adapter makes the remaining one active (0.15 kept naming the deleted one: ``KeyError``).

    Installed on the instance (bound methods, which ``copy.deepcopy`` rebinds), once, when ``tuner`` is its
    ``base_model``; a no-op for anything else and on a peft whose ``PeftModel`` has these rules.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel) or peft_model.base_model is not tuner:
        return
    if "_ilora_peft_021_rules" in peft_model.__dict__:
        return
    rules = {"_ilora_peft_021_rules": True}
    if not peft_model_has("set_requires_grad"):
        rules.update(add_adapter=_add_adapter, load_adapter=_load_adapter)
    if not peft_model_has("delete_adapter"):
        rules["delete_adapter"] = _delete_adapter
    for name, method in rules.items():
        peft_model.__dict__[name] = method if name.startswith("_") else types.MethodType(method, peft_model)


@contextlib.contextmanager
def _trainability_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every existing parameter's ``requires_grad`` on exit (by name: loading may replace a parameter);
    parameters created inside stay frozen."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad = before.get(name, False)


def _add_adapter(self: Any, adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> None:
    with _trainability_kept(self):
        type(self).add_adapter(self, adapter_name, peft_config, *args, **kwargs)


def _load_adapter(
    self: Any, model_id: Any, adapter_name: str, is_trainable: bool = False, *args: Any, **kwargs: Any
) -> Any:
    new = adapter_name not in self.peft_config
    with _trainability_kept(self):
        result = type(self).load_adapter(self, model_id, adapter_name, is_trainable, *args, **kwargs)
    if new and is_trainable:
        set_adapter_trainable(self, adapter_name)
    return result


def _delete_adapter(self: Any, adapter_name: str) -> None:
    self.base_model.delete_adapter(adapter_name)
    active = self.active_adapters
    if len(active) == 1:  # peft 0.21's PeftModel.delete_adapter
        self.active_adapter = active[0]


def set_adapter_trainable(model: torch.nn.Module, adapter_name: str, requires_grad: bool = True) -> None:
    """peft 0.21's ``PeftModel.set_requires_grad(adapter_name, requires_grad)``: the adapter's layers and its
    ``modules_to_save`` copies (a one-expert router stays frozen: ``ILoraLayer.set_requires_grad``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)
                if adapter_name in layers:
                    layers[adapter_name].requires_grad_(requires_grad)
            freeze = getattr(module, "_freeze_one_expert_routers", None)
            if callable(freeze):
                freeze()
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(requires_grad)
