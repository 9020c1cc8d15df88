"""Extension points: routers and gates registered under a name, the name saved in ``adapter_config.json``.

Two kinds of part, each with a small interface:

- **Router** (``ILoraConfig.router``): a class (or any callable) ``RouterClass(d_in, num_experts, config)`` returning
  an ``nn.Module`` whose ``forward(x)`` takes the routed layer's input ``x [..., d_in]`` and returns logits
  ``[T, num_experts]`` in at least float32, ``T = prod(x.shape[:-1])`` (one row per token of the flattened input).
  Its parameters and buffers are the adapter's ``ilora_router`` entries: saved, loaded and trained with it.
  Per-call inputs (task ids, the router signal, the attention mask) come from ``ilora.context.current_call()``.
- **Gate** (``ILoraConfig.routing``): a class ``GateClass(config)`` whose instances are called as
  ``gate(logits, training)`` with the router's logits ``[T, E]`` (at least float32) and return an
  ``ilora.router.Gates``: dense weights ``[T, E]`` (every expert computed), or top-k ``weights`` and ``indices``
  ``[T, k]`` with a fixed ``k`` (a slot whose weight is 0 is unused: that is how a variable number of experts per
  token travels through the top-k compute paths). Gates hold no parameters (learned routing belongs to a router).

``register_router`` / ``register_gate`` add a part (also usable as decorators); the name goes into the config, and
the class's import path into ``ILoraConfig.part_classes``. A config naming a part that this process has not
registered (a checkpoint loaded before the code defining the part was imported) is refused with the class to import.
Checkpoints never import code by themselves: loading one must not run arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from . import gates as _gates
from . import router as _router

if TYPE_CHECKING:
    from .config import ILoraConfig

T = TypeVar("T")

ROUTERS: dict[str, Callable[..., nn.Module]] = {}
GATES: dict[str, Callable[..., Any]] = {}
# Parts shipped with ilora: always registered, so their class paths are not saved in configs.
BUILTIN_ROUTERS = ("token", "sequence", "task", "noisy_token", "signal")
BUILTIN_GATES = ("soft", "topk", "top_p")
_KINDS = {"router": (ROUTERS, "register_router"), "routing": (GATES, "register_gate")}


class UnregisteredPartError(ValueError):
    """A config names a router or gate that is not registered in this process."""


def class_path(obj: Any) -> str:
    """``module.QualName`` of a class or function, as saved in ``ILoraConfig.part_classes``."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _register(kind: str, name: str, cls: T | None, overwrite: bool) -> T | Callable[[T], T]:
    table, function = _KINDS[kind]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{function}: the name must be a non-empty string, got {name!r}")

    def add(part: T) -> T:
        if not callable(part):
            raise TypeError(f"{function}({name!r}, ...): expected a class, got {part!r}")
        builtin = BUILTIN_ROUTERS if kind == "router" else BUILTIN_GATES
        if name in builtin and table.get(name) is not None and table[name] is not part:
            raise ValueError(f"{function}: {name!r} is a built-in part of ilora and cannot be replaced")
        redefined = name in table and class_path(table[name]) == class_path(part)  # a re-run cell, a reload
        if name in table and table[name] is not part and not (overwrite or redefined):
            raise ValueError(
                f"{function}: {name!r} is already registered to {class_path(table[name])}; pick another name or pass "
                "overwrite=True"
            )
        table[name] = part
        return part

    return add if cls is None else add(cls)


def register_router(name: str, cls: T | None = None, *, overwrite: bool = False) -> Any:
    """Register a router class under ``name`` (``ILoraConfig(router=name)``); see the module docstring for its
    interface. ``register_router("mine", MyRouter)`` or ``@register_router("mine")`` on the class."""
    return _register("router", name, cls, overwrite)


def register_gate(name: str, cls: T | None = None, *, overwrite: bool = False) -> Any:
    """Register a gate class under ``name`` (``ILoraConfig(routing=name)``); see the module docstring."""
    return _register("routing", name, cls, overwrite)


def resolve(kind: str, name: str, saved_classes: dict[str, str] | None) -> str | None:
    """Check that the part ``name`` of ``kind`` ("router" or "routing") is registered, and that it is the class the
    config was saved with. Returns the class path to save (None for built-in parts)."""
    table, function = _KINDS[kind]
    builtin = BUILTIN_ROUTERS if kind == "router" else BUILTIN_GATES
    saved = (saved_classes or {}).get(kind)
    if name not in table:
        known = ", ".join(repr(n) for n in table)
        if saved is None:
            raise UnregisteredPartError(
                f"ILoraConfig.{kind}: no {kind} part is registered under {name!r} (registered: {known}). A custom part "
                f"must be registered before the config is created or loaded: ilora.{function}({name!r}, YourClass)"
            )
        module, _, qualname = saved.rpartition(".")
        if module == "__main__":
            raise UnregisteredPartError(
                f"ILoraConfig.{kind}: this adapter uses the {kind} {name!r}, class {qualname}, defined in the script "
                f"that saved it (__main__), and not registered in this process. Define it here and call "
                f"ilora.{function}({name!r}, {qualname}) before loading; better, move it into an importable module."
            )
        raise UnregisteredPartError(
            f"ILoraConfig.{kind}: this adapter uses the {kind} {name!r}, class {saved}, which is not registered in "
            f"this process (registered: {known}). Import it and register it before loading, e.g. "
            f"`from {module} import {qualname}; ilora.{function}({name!r}, {qualname})` (or import the module whose "
            f"@ilora.{function}({name!r}) decorator registers it). Checkpoints never import code by themselves."
        )
    if name in builtin:
        return None
    current = class_path(table[name])
    if saved is not None and saved != current:
        raise UnregisteredPartError(
            f"ILoraConfig.{kind}: the adapter was saved with {kind} {name!r} = {saved}, but {name!r} is registered "
            f"to {current} in this process: register the saved class under {name!r}, or, if the class moved, set "
            f"part_classes[{kind!r}] to {current!r} in adapter_config.json"
        )
    return current


def build_router(config: ILoraConfig, d_in: int) -> nn.Module:
    """The router of one adapted linear with input width ``d_in``, from the registry."""
    resolve("router", config.router, config.part_classes)
    return ROUTERS[config.router](d_in, config.num_experts, config)


def apply_gate(config: ILoraConfig, logits: torch.Tensor, training: bool) -> _router.Gates:
    """Routing weights of one forward: the registered gate ``config.routing`` applied to ``logits [T, E]``.
    The shapes of what the router and the gate return are checked (no device sync), naming the part at fault."""
    E = config.num_experts
    if logits.dim() != 2 or logits.shape[1] != E or not logits.is_floating_point():
        raise ValueError(
            f"router {config.router!r} returned logits of shape {tuple(logits.shape)} and dtype {logits.dtype}: a "
            f"router returns float logits [tokens, num_experts={E}] (see ilora.registry)"
        )
    gates = GATES[config.routing](config)(logits, training)
    dense, weights, indices = (getattr(gates, n, None) for n in ("dense", "weights", "indices"))
    tokens = logits.shape[0]
    ok = isinstance(gates, _router.Gates) and (
        (dense is not None and weights is None and tuple(dense.shape) == (tokens, E))
        or (
            dense is None
            and weights is not None
            and indices is not None
            and weights.dim() == 2
            and tuple(weights.shape) == tuple(indices.shape)
            and weights.shape[0] == tokens
            and 1 <= weights.shape[1] <= E
            and indices.dtype == torch.long
        )
    )
    if not ok:
        shapes = {n: None if t is None else (tuple(t.shape), t.dtype) for n, t in (("dense", dense),
                  ("weights", weights), ("indices", indices))}  # fmt: skip
        raise ValueError(
            f"gate {config.routing!r} returned {type(gates).__name__} {shapes} for {tokens} tokens and {E} experts: a "
            f"gate returns ilora.router.Gates with dense [tokens, {E}], or weights and int64 indices [tokens, k], "
            f"k <= {E} (see ilora.registry)"
        )
    return gates


# ---------------------------------------------------------------------------------------------- built-in parts
def _token(d_in: int, num_experts: int, config: ILoraConfig) -> nn.Module:
    return _router.TokenRouter(d_in, num_experts)


def _sequence(d_in: int, num_experts: int, config: ILoraConfig) -> nn.Module:
    return _router.SequenceRouter(d_in, num_experts)


def _task(d_in: int, num_experts: int, config: ILoraConfig) -> nn.Module:
    assert config.num_tasks is not None  # validated by ILoraConfig
    return _router.TaskRouter(config.num_tasks, num_experts)


class SoftGate:
    """Every expert weighted by ``softmax(logits / router_temperature)``: dense ``[T, E]``."""

    def __init__(self, config: ILoraConfig) -> None:
        self.temperature = config.router_temperature

    def __call__(self, logits: torch.Tensor, training: bool) -> _router.Gates:
        return _router.gate(logits, "soft", 1, self.temperature)


class TopKGate:
    """The ``top_k`` most probable experts, renormalized over the chosen ones (Mixtral); top-1 keeps the router
    probability (Switch). ``weights``, ``indices`` ``[T, top_k]``."""

    def __init__(self, config: ILoraConfig) -> None:
        self.top_k, self.temperature = config.top_k, config.router_temperature

    def __call__(self, logits: torch.Tensor, training: bool) -> _router.Gates:
        return _router.gate(logits, "topk", self.top_k, self.temperature)


def _noisy_token(d_in: int, num_experts: int, config: ILoraConfig) -> nn.Module:
    return _gates.NoisyTokenRouter(d_in, num_experts)


def _signal(d_in: int, num_experts: int, config: ILoraConfig) -> nn.Module:
    assert config.router_signal_dim is not None  # validated by ILoraConfig
    return _router.SignalRouter(config.router_signal_dim, num_experts)


def _register_builtins() -> None:
    routers = (
        ("token", _token), ("sequence", _sequence), ("task", _task), ("noisy_token", _noisy_token), ("signal", _signal)
    )  # fmt: skip
    for name, factory in routers:
        ROUTERS.setdefault(name, factory)
    for name, gate_cls in (("soft", SoftGate), ("topk", TopKGate), ("top_p", _gates.TopPGate)):
        GATES.setdefault(name, gate_cls)


_register_builtins()
