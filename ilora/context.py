"""Per-call routing state: task ids, router signals, the attention mask, the routing recorder, a generation's sequence
gates and the gates a router group's leader hands its followers.

Routed layers sit deep inside models whose code we do not own, so what a router needs besides its input (task ids,
which tokens are padding) reaches them as the state of the call being computed. It lives in context variables
(``contextvars``; the per-call idea of PEFT's ``_enable_peft_forward_hooks``): every thread and every asyncio task
sees only the state of its own calls, so two models, or one model, served from several threads never read each
other's task ids, masks or recorder. A thread started inside a call does not inherit it (pass ``ilora_task_ids=`` to
the call made there, or run it in ``contextvars.copy_context()``).

Activation checkpointing recomputes a training forward during backward, possibly on another thread (autograd's device
threads). ``bind_for_backward`` ties the forward's state to the backward passes that reach its outputs; while such a
pass runs, ``current_call()`` returns that state, whatever thread asks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn


@dataclass
class RoutingRecorder:
    """Routing weights per layer, gathered while ``record_routing`` is active in this thread or task.

    ``weights[layer_name]`` is a list (one entry per forward) of dense ``[tokens, num_experts]`` float32 CPU tensors
    (top-k routing is scattered back to dense, zeros for unselected experts). Padding tokens (attention mask 0) are
    left out: ``tokens`` counts the call's real tokens, batch-major. Recomputation under activation checkpointing is
    not recorded again.
    """

    weights: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def add(self, layer_name: str, gates: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Record ``gates [T, E]``, only the rows where ``keep`` (bool ``[T]``) is true when given, detached (a
        float32 CPU tensor's ``.float().cpu()`` is itself, which would keep the forward's graph alive)."""
        kept = gates.detach() if keep is None else gates.detach()[keep]
        self.weights[layer_name].append(kept.float().cpu())

    def usage(self, group: torch.distributed.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Mean routing weight per expert for each layer, over every recorded token (of every rank of ``group``,
        when given: every rank must call it, having recorded the same layers)."""
        names = sorted(self.weights)
        sums = [torch.cat(self.weights[n]).sum(0) for n in names]
        counts = [float(sum(w.shape[0] for w in self.weights[n])) for n in names]
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            import torch.distributed as dist

            flat = torch.cat([torch.cat(sums), torch.tensor(counts)]) if names else torch.zeros(0)
            sizes = torch.tensor([flat.numel(), -flat.numel()])
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
            if int(sizes[0]) != -int(sizes[1]):
                raise RuntimeError("RoutingRecorder.usage: ranks recorded different routed layers")
            backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            flat = flat.to(backend_device)
            dist.all_reduce(flat, group=group)
            flat = flat.cpu()
            head = flat[: flat.numel() - len(names)]
            sums = list(head.split([s.numel() for s in sums]))
            counts = flat[-len(names) :].tolist() if names else []
        return {n: s / c for n, s, c in zip(names, sums, counts, strict=True)}


@dataclass(frozen=True)
class CallState:
    """The routing state of one call: ``task_ids [batch]`` (or one id), ``router_inputs`` (the signal of
    ``router="signal"``, ``[batch, seq, d_signal]`` or ``[tokens, d_signal]``), ``attention_mask [batch, seq]``,
    ``position_ids [batch | 1, seq]`` (a packed batch restarts them at 0 at each sequence it holds).

    ``sequence_gates`` maps a sequence router to the logits it chose on a generation's prompt; ``reuse_sequence_gates``
    is set on cached decode steps, which keep them; ``past_length`` is the number of cached tokens before this call's
    and ``generating`` is set inside ``ILoraModel.generate``. ``group_gates`` holds the gates a router group's leader
    computed in this call, for its followers (see ``share_group_gates``). ``module`` is the model whose call set this
    state and ``parent`` the state to restore when that call returns.
    """

    task_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    sequence_gates: dict[int, torch.Tensor] | None = None
    reuse_sequence_gates: bool = False
    module: nn.Module | None = None
    parent: CallState | None = None
    router_inputs: torch.Tensor | None = None
    past_length: int = 0
    generating: bool = False
    group_gates: dict[tuple[int, str], Any] | None = None


_T = TypeVar("_T")


class _ThreadValue(threading.local):
    def __init__(self, default: Any) -> None:
        self.value = default


class CompiledVisibleVar(Generic[_T]):
    """A ``ContextVar`` that ``torch.compile`` code reads without a graph break.

    Dynamo cannot trace ``ContextVar.get`` (a graph break at every routed layer), but it traces attribute reads of a
    ``threading.local``: tensors found there become graph inputs (no recompile when their values change), other
    values are guarded. So every ``set``/``reset`` also writes the value to a per-thread copy, every eager ``get``
    brings that copy up to date with the running task's value, and code being compiled reads the copy. Eager code
    reads the ``ContextVar`` itself, so each thread and asyncio task keeps its own state as before. Compiled code
    sees the state of its thread's latest model call (each call sets it) or ``routing_context``: asyncio tasks that
    interleave ``routing_context`` blocks in one thread around compiled calls of a bare layer are not separated.
    """

    def __init__(self, name: str, default: _T) -> None:
        self._var: ContextVar[_T] = ContextVar(name, default=default)  # the defaults are immutable
        self._mirror = _ThreadValue(default)

    def get(self) -> _T:
        if torch.compiler.is_compiling():
            return self._mirror.value
        value = self._var.get()
        self._mirror.value = value
        return value

    def set(self, value: _T) -> Token[_T]:
        token = self._var.set(value)
        self._mirror.value = value
        return token

    def reset(self, token: Token[_T]) -> None:
        self._var.reset(token)
        self._mirror.value = self._var.get()


# The default is frozen and holds no container: nothing can mutate it.
_CALL: CompiledVisibleVar[CallState] = CompiledVisibleVar("ilora_call", CallState())
_RECORDER: CompiledVisibleVar[RoutingRecorder | None] = CompiledVisibleVar("ilora_recorder", None)
# The sequence gates of the generation running in this thread or task: set on its prompt, read by its decode steps.
_GENERATION: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("ilora_generation", default=None)

# Backward passes (graph task ids) -> the state of the training forward they recompute; _CONFLICT when one pass
# reaches several forwards with different states.
_BOUND: dict[int, CallState | None] = {}
_BOUND_LOCK = threading.Lock()
_CONFLICT = None
_MISSING: Any = object()


def current_call() -> CallState:
    """The routing state of the call being computed.

    Inside a backward pass that reaches a bound training forward (see ``bind_for_backward``), that is activation
    checkpointing recomputing the forward: it sees the forward's state, on whatever thread, not the caller's now.
    """
    if not _BOUND:
        return _CALL.get()
    state = _BOUND.get(torch._C._current_graph_task_id(), _MISSING)
    if state is _MISSING:
        return _CALL.get()
    if state is _CONFLICT:
        raise RuntimeError(
            "one backward pass recomputes (activation checkpointing) several training forwards that were given "
            "different task ids or attention masks, so which one a recomputed layer belongs to is unknown: call "
            "backward after each forward (as training loops and gradient accumulation do), or disable checkpointing"
        )
    return state


def call_state() -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(task_ids, attention_mask)`` of the call being computed (see ``current_call``)."""
    state = current_call()
    return state.task_ids, state.attention_mask


def recomputing() -> bool:
    """True while autograd runs a backward pass: a forward run now is activation checkpointing recomputing one.

    Code being compiled takes it as False while no backward pass is bound (``bind_for_backward``): torch.compile's
    own checkpointing recomputes inside the compiled backward without running this Python, and reading the graph
    task id is a graph break. A compiled bare layer recomputed by eager checkpointing outside an ``ILoraModel`` call
    therefore records its routing again."""
    if torch.compiler.is_compiling() and not _BOUND:
        return False
    return torch._C._current_graph_task_id() != -1


def current_recorder() -> RoutingRecorder | None:
    """The recorder of ``record_routing`` active in this thread or task, if any."""
    return _RECORDER.get()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))


def _bind(state: CallState, grad: torch.Tensor) -> None:
    gid = torch._C._current_graph_task_id()
    with _BOUND_LOCK:
        if gid not in _BOUND:
            _BOUND[gid] = state
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_unbind, gid))
            return
        bound = _BOUND[gid]
    if bound is _CONFLICT or bound is state:
        return
    if not all(_same(getattr(bound, f), getattr(state, f)) for f in _PER_CALL_INPUTS):
        with _BOUND_LOCK:
            _BOUND[gid] = _CONFLICT


# The inputs of a call that a recomputed layer must see as they were in its forward.
_PER_CALL_INPUTS = ("task_ids", "router_inputs", "attention_mask", "position_ids")


def _unbind(gid: int) -> None:
    with _BOUND_LOCK:
        _BOUND.pop(gid, None)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def bind_for_backward(outputs: Any, state: CallState | None = None) -> None:
    """Let every backward pass that reaches a tensor of ``outputs`` (tensors, nested in dicts, lists, tuples, model
    outputs) see ``state`` (default: the current call's) while it recomputes checkpointed layers.

    Code being compiled binds nothing (a hook dynamo would have to trace, a graph break per layer): torch.compile's
    own checkpointing recomputes inside the compiled backward, where no state is read, and an ``ILoraModel`` call
    binds its outputs in its hooks, which run eagerly."""
    if torch.compiler.is_compiling():
        return
    hook = functools.partial(_bind, current_call() if state is None else state)
    for t in _tensors(outputs):
        if t.requires_grad:
            t.register_hook(hook)


# The forward keyword that carries task ids into a model wrapped by PEFT (``model(**batch, ilora_task_ids=ids)``).
TASK_IDS_KWARG = "ilora_task_ids"
# The forward keyword that carries the signal of ``router="signal"`` (``model(**batch, ilora_router_inputs=s)``).
ROUTER_INPUTS_KWARG = "ilora_router_inputs"


def as_task_tensor(task_ids: int | torch.Tensor | list[int]) -> torch.Tensor:
    """Task ids as a 1-D int64 tensor; ``TypeError`` for anything but integers."""
    t = torch.as_tensor(task_ids)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must be integers, got dtype {t.dtype}")
    return t.reshape(-1).long()


def enter_call(
    module: nn.Module,
    task_ids: Any = None,
    attention_mask: Any = None,
    past_length: int = 0,
    position_ids: Any = None,
    router_inputs: Any = None,
) -> None:
    """Start a call of ``module``: its task ids, router signal, mask and position ids (inherited from the enclosing
    call when not given) after ``past_length`` cached tokens; a call that is not a cached decode step
    (``past_length == 0``) starts a new generation's sequence gates. Every call starts with no router group gates.
    End it with ``exit_call``."""
    ids = None if task_ids is None else as_task_tensor(task_ids)
    signal = None if router_inputs is None else as_router_inputs(router_inputs)
    outer = _CALL.get()
    decoding = past_length > 0
    gates = _GENERATION.get() if decoding else None
    if gates is None:
        gates = {}
        _GENERATION.set(gates)
    _CALL.set(CallState(
        task_ids=outer.task_ids if ids is None else ids,
        attention_mask=outer.attention_mask if attention_mask is None else attention_mask,
        position_ids=outer.position_ids if position_ids is None else position_ids,
        sequence_gates=gates, reuse_sequence_gates=decoding, module=module, parent=outer,
        router_inputs=outer.router_inputs if signal is None else signal, past_length=past_length,
        generating=outer.generating, group_gates={},
    ))  # fmt: skip


def exit_call(module: nn.Module) -> CallState | None:
    """End the call of ``module`` started by ``enter_call`` and return its state (None if it never started)."""
    state = _CALL.get()
    if state.module is not module or state.parent is None:
        return None
    _CALL.set(state.parent)
    return state


def share_group_gates(key: tuple[int, str], value: Any) -> None:
    """Hand ``value`` (a router group leader's gates of this call) to the group's followers: kept in the current
    call's state, so every call (each decode step included) starts without it, and a checkpointed block recomputed
    in backward replaces it with its recomputed gates before its followers run again. No-op outside a model call."""
    shared = current_call().group_gates
    if shared is not None:
        shared[key] = value


def shared_group_gates(key: tuple[int, str]) -> Any:
    """What ``share_group_gates`` stored under ``key`` in the current call, or None."""
    shared = current_call().group_gates
    return None if shared is None else shared.get(key)


def token_mask(batch: int, seq: int) -> torch.Tensor | None:
    """The current call's 2-D attention mask, its last ``seq`` columns ``[batch, seq]``, for a layer input of
    ``batch`` rows of ``seq`` tokens; None without a mask or when the mask does not line up with that input (towers
    with their own token layout).

    Raises ``ValueError`` for a mask of another rank (a 4-D additive or boolean mask) that lines up with the input:
    which tokens are padding cannot be read from it exactly, and treating them all as real would be silently wrong.
    """
    mask = current_call().attention_mask
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, -seq:] if mask.shape[0] == batch and mask.shape[1] >= seq else None
    if mask.dim() >= 3 and mask.shape[0] in (1, batch) and mask.shape[-2] == seq:
        raise ValueError(
            f"ILoRA got a {mask.dim()}-D attention_mask of shape {tuple(mask.shape)}: the sequence router and the "
            "router statistics (aux losses, record_routing) need to know which tokens are padding, which a "
            f"{mask.dim()}-D mask does not say exactly. Pass the 2-D attention_mask [batch, seq] (1 = real token) "
            "and let the model build its own, or use router='token' without aux losses or record_routing"
        )
    return None


def padding_mask_for(x: torch.Tensor) -> torch.Tensor | None:
    """The current call's attention mask as a bool ``[batch * seq]`` token mask when ``x [batch, seq, d]`` lines up
    with it (the language model's layers); None elsewhere (towers with their own token layout, 2-D inputs). A
    packed batch (sequences concatenated in a row, no mask) has no padding: every token counts. ``ValueError``
    for a mask that is not 2-D (see ``token_mask``)."""
    if x.dim() != 3:
        return None
    mask = token_mask(x.shape[0], x.shape[1])
    full = current_call().attention_mask
    if mask is None or full is None or full.shape[1] != x.shape[1]:  # a decode step's mask covers the cache too
        return None
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


def segment_ids(batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
    """The index of the packed sequence each token belongs to, ``[batch, seq]`` int64 on ``device``, counted from
    the current call's ``position_ids`` restarting at 0 (TRL's padding-free packing); None without 2-D position ids
    ``[batch | 1, seq]`` (3-D multimodal rotary positions are not read). Read without a host sync; a row without
    restarts is one sequence (segment 0), and so is left padding before the first 0 (``generate``'s position ids)."""
    pos = current_call().position_ids
    if pos is None or pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != seq:
        return None  # position ids cover a call's new tokens only: a tower of another length does not line up
    starts = pos.to(device) == 0
    return (starts.long().cumsum(1) - 1).clamp_min(0).expand(batch, seq)


def as_router_inputs(router_inputs: Any) -> torch.Tensor:
    """The router signal as a tensor, ``[batch, seq, d_signal]`` or ``[tokens, d_signal]`` floats; ``TypeError`` for
    another dtype, ``ValueError`` for another rank."""
    t = torch.as_tensor(router_inputs)
    if not t.is_floating_point():
        raise TypeError(
            f"{ROUTER_INPUTS_KWARG} must be a floating-point tensor [batch, seq, d_signal] or [tokens, d_signal], got "
            f"dtype {t.dtype}: convert it, e.g. signal.float()"
        )
    if t.dim() not in (2, 3):
        raise ValueError(
            f"{ROUTER_INPUTS_KWARG} must be [batch, seq, d_signal] or [tokens, d_signal], got shape {tuple(t.shape)}"
        )
    return t


@contextlib.contextmanager
def routing_context(
    task_ids: int | torch.Tensor | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    router_inputs: torch.Tensor | None = None,
    *,
    generating: bool | None = None,
) -> Iterator[None]:
    """Give every routed layer the task ids (``[batch]`` or one int for all), router signal (``router="signal"``,
    ``[batch, seq, d_signal]`` or ``[tokens, d_signal]``) and/or attention mask of the calls made inside, in this
    thread or task only.

    Use it around ``model.generate(...)`` or any call that cannot take an ``ilora_task_ids=`` /
    ``ilora_router_inputs=`` keyword. ``generating`` is set by ``ILoraModel.generate`` (see ``SignalRouter``).
    """
    outer = _CALL.get()
    token = _CALL.set(CallState(
        task_ids=outer.task_ids if task_ids is None else as_task_tensor(task_ids),
        attention_mask=outer.attention_mask if attention_mask is None else attention_mask,
        position_ids=outer.position_ids, sequence_gates=outer.sequence_gates,
        reuse_sequence_gates=outer.reuse_sequence_gates, module=outer.module, parent=outer.parent,
        router_inputs=outer.router_inputs if router_inputs is None else as_router_inputs(router_inputs),
        past_length=outer.past_length, generating=outer.generating if generating is None else generating,
        group_gates=outer.group_gates,
    ))  # fmt: skip
    try:
        yield
    finally:
        _CALL.reset(token)


@contextlib.contextmanager
def record_routing() -> Iterator[RoutingRecorder]:
    """Record every routed layer's routing weights while active, in this thread or task; no cost when not used."""
    recorder = RoutingRecorder()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)
