"""Everything that touches PEFT's registries, with the version guards, in one place.

PEFT (>= 0.15) lets a third-party method register itself, but its ``PeftType`` enum is closed: the member has to be
added before ``register_peft_method`` accepts the name. Both steps are idempotent so a re-import is harmless.
"""

from __future__ import annotations

import enum

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
