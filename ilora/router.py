"""Routers (token, sequence, task, signal) and the gates that turn their logits into routing weights.

A router maps a routed layer's input ``x [..., d_in]`` to logits ``[tokens, E]``, one row per token of the flattened
input; sequence and task routers make one decision per sequence and repeat it over its tokens; the signal router
projects a per-token signal given with the call instead of ``x``.

Numerics: the router's matmul, its softmax and its top-k run in float32 (float64 for float64 inputs) whatever the
autocast state and the dtypes of the input and the adapter, as MegaBlocks (``layers/router.py``) and Mixtral in
transformers (``router_logits`` upcast before softmax) do: half-precision logits flip top-k choices and overflow
(fp16 tops out at 65504).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .context import ROUTER_INPUTS_KWARG, TASK_IDS_KWARG, current_call, segment_ids, token_mask


def routing_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any of ``tensors`` is: the precision routing is computed in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast does not lower the precision of matmuls (``torch.autocast(..., enabled=False)``)."""
    return torch.autocast(device.type, enabled=False)


def routing_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in ``routing_dtype`` whatever the autocast state: ``x [..., d_in]``, ``weight [E, d_in]``."""
    dtype = routing_dtype(x, weight)
    with no_autocast(x.device):
        return nn.functional.linear(x.to(dtype), weight.to(dtype))


class TokenRouter(nn.Module):
    """Per-token logits ``x @ weight.T``, ``weight [E, d_in]``: the ``nn.Linear`` layout of the authors' ``lora_route``.

    That layout also makes the weight gradient ``dlogits.T @ x``, far faster on CPU than ``x.T @ dlogits``.
    """

    def __init__(self, d_in: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default (kaiming-uniform, a=sqrt(5)) as the authors use: bound 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routing_linear(x.reshape(-1, x.shape[-1]), self.weight)


class SequenceRouter(TokenRouter):
    """One decision per sequence from the mean of its (unmasked) tokens.

    For ``x [batch, seq, d_in]`` the model's 2-D attention mask (captured per call, see ``ilora.context``) selects
    the tokens; its last ``seq`` columns are used so cached decode steps line up. A packed row (several sequences
    concatenated, ``position_ids`` restarting at 0 at each, as TRL's padding-free packing gives) gets one decision
    per sequence. A 4-D attention mask is refused (``ValueError``, see ``context.token_mask``). A 2-D input is a
    set of independent rows, each its own sequence. During cached generation the decision taken on the prompt (on
    its last sequence) is kept for the decode steps, so a sequence keeps its experts while it is generated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            return super().forward(x)
        state = current_call()
        kept = state.sequence_gates if state.sequence_gates is not None else {}
        cached = kept.get(id(self))
        batch, seq = x.shape[0], math.prod(x.shape[1:-1])
        if state.reuse_sequence_gates and cached is not None and cached.shape[0] == batch:
            return cached.repeat_interleave(seq, dim=0)
        xs = x.reshape(batch, seq, x.shape[-1]).to(routing_dtype(x, self.weight))
        mask = token_mask(batch, seq)
        segments = segment_ids(batch, seq, x.device) if x.dim() == 3 else None
        with no_autocast(x.device):
            m = xs.new_ones(batch, seq, 1) if mask is None else mask.to(xs.device, xs.dtype).unsqueeze(-1)
            if segments is None:
                pooled = (xs * m).sum(1) / m.sum(1).clamp_min(1.0)
            else:  # [batch, seq] slots, one per possible sequence of a row
                index = segments.unsqueeze(-1)
                sums = xs.new_zeros(xs.shape).scatter_add(1, index.expand_as(xs), xs * m)
                counts = m.new_zeros(m.shape).scatter_add(1, index, m)
                pooled = sums / counts.clamp_min(1.0)
        logits = routing_linear(pooled, self.weight)
        if segments is not None:
            logits = logits.gather(1, segments.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [batch, seq, E]
            kept[id(self)] = logits[:, -1].detach()
            return logits.reshape(batch * seq, -1)
        kept[id(self)] = logits.detach()
        return logits.repeat_interleave(seq, dim=0)


def trainer_column_hint(kwarg: str) -> str:
    """How a Trainer user keeps the dataset column ``kwarg`` that a router reads from the call."""
    return (
        f"Training with transformers' Trainer (or TRL's)? Its remove_unused_columns=True drops an '{kwarg}' dataset "
        "column: use ilora.ILoraTrainer (or AuxLossMixin on your Trainer subclass), which keeps it, or set "
        "TrainingArguments(remove_unused_columns=False)"
    )


class TaskRouter(nn.Module):
    """A learned logit table ``weight [num_tasks, E]`` indexed by the task ids of the current call."""

    def __init__(self, num_tasks: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Random, not zero: with zero logits and zero B every expert would receive identical updates forever.
        nn.init.normal_(self.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = current_call().task_ids
        if ids is None:
            raise ValueError(
                "this adapter routes by task (router='task') but no task ids were given: pass ilora_task_ids=... to "
                "the model's forward, or wrap the call in ilora.routing_context(task_ids=...). "
                + trainer_column_hint(TASK_IDS_KWARG)
            )
        rows = self.task_logits(ids)
        if x.dim() >= 3:
            rows = expanded_for_generation(rows, x.shape[0])
        tokens, n = math.prod(x.shape[:-1]), rows.shape[0]
        if n == 1:
            return rows.expand(tokens, -1)
        if not ((x.dim() >= 3 and n == x.shape[0]) or (x.dim() == 2 and n == tokens)):
            raise ValueError(
                f"got {n} task ids for an input of shape {tuple(x.shape)}: give one id per batch row "
                "(or one per row of a 2-D input, or a single id for all)"
            )
        per_row = tokens // n
        return rows.repeat_interleave(per_row, dim=0)

    def task_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(ids), E]`` for the given task ids (on any device), range-checked by ``check_ids_in_range``."""
        num_tasks = self.weight.shape[0]
        check_ids_in_range(ids, num_tasks, lambda got: f"task ids must be in [0, {num_tasks}), got {got}")
        # Checked where the ids are: host ids (as ``routing_context`` makes them from a list) give the exact error.
        return self.weight[ids.to(self.weight.device, non_blocking=True)].to(routing_dtype(self.weight))


class SignalRouter(TokenRouter):
    """Per-token logits from a signal given with the call, not from the layer's input: ``signal @ weight.T``,
    ``weight [E, d_signal]`` (``ILoraConfig.router_signal_dim``), in float32 as every router.

    The signal (``ilora_router_inputs=`` on the model's forward or ``generate``, or ``ilora.routing_context(
    router_inputs=...)``) is ``[batch, N, d_signal]`` for ``x [batch, seq, d_in]``, or ``[tokens, d_signal]`` (one row
    per token of the flattened input, any input rank). For a 3-D signal, with ``past`` tokens in the KV cache:

    - ``N == seq``: the signal of this call's tokens;
    - ``N == past + seq`` (a cached decode step given the whole sequence so far): its last ``seq`` rows, as the
      attention mask's;
    - inside ``generate``: ``N >= past + seq``, rows ``[past, past + seq)``: give the signal of the prompt and of every
      token to generate (``N >= prompt length + max_new_tokens``).

    Anything else raises ``ValueError`` naming both shapes; a missing signal raises ``ValueError``, a non-float one
    ``TypeError``. Padding positions need a row too (any values): their routing is left out of the router losses and
    the recorder as for every router. Follows the issue's "user-supplied signal" part (modality or interaction features,
    as Crab+'s routing motivates).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routing_linear(signal_rows(x, self.weight.shape[1]).to(self.weight.device), self.weight)


def signal_rows(x: torch.Tensor, d_signal: int) -> torch.Tensor:
    """The current call's router signal lined up with the routed input ``x [..., d_in]``: ``[tokens, d_signal]``
    (the rule is ``SignalRouter``'s)."""
    state = current_call()
    signal = state.router_inputs
    if signal is None:
        raise ValueError(
            f"this adapter routes by a signal (router='signal') but none was given: pass {ROUTER_INPUTS_KWARG}=... "
            f"[batch, seq, {d_signal}] to the model's forward (or generate), or wrap the call in "
            "ilora.routing_context(router_inputs=...). " + trainer_column_hint(ROUTER_INPUTS_KWARG)
        )
    tokens = math.prod(x.shape[:-1])
    if signal.shape[-1] != d_signal:
        raise ValueError(f"{ROUTER_INPUTS_KWARG} of shape {tuple(signal.shape)} has {signal.shape[-1]} features per "
                         f"token; the router takes router_signal_dim={d_signal}")  # fmt: skip
    if signal.dim() == 2:
        if signal.shape[0] != tokens:
            raise _misaligned(signal, x, f"a 2-D signal needs one row per token ({tokens})")
        return signal
    if x.dim() == 3:
        signal = expanded_for_generation(signal, x.shape[0])
    if x.dim() != 3 or signal.shape[0] != x.shape[0]:
        raise _misaligned(signal, x, "a 3-D signal needs an input [batch, seq, d_in] of the same batch")
    n, seq, past = signal.shape[1], x.shape[1], state.past_length
    if state.generating:
        if n < past + seq:
            raise _misaligned(signal, x, f"inside generate the signal must cover the prompt and every generated token; "
                              f"this step needs positions up to {past + seq} ({past} cached)")  # fmt: skip
        rows = signal[:, past : past + seq]
    elif n in (seq, past + seq):
        rows = signal[:, n - seq :]
    else:
        raise _misaligned(signal, x, f"give {seq} rows (this call's tokens) or {past + seq} ({past} cached, {seq} new)")
    return rows.reshape(tokens, d_signal)


def expanded_for_generation(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row routing inputs (task ids, a signal: ``[n, ...]``) lined up with a ``batch`` that ``generate`` expanded:
    beam search and ``num_return_sequences`` repeat each prompt row ``batch // n`` times in a row (transformers'
    ``_expand_inputs_for_generation``, ``repeat_interleave``), and so are the rows. Outside ``generate``, or when
    ``batch`` is not a multiple of ``n``, the rows are returned as they are (the caller checks them)."""
    n = rows.shape[0]
    if not current_call().generating or n == batch or n == 0 or batch % n:
        return rows
    return rows.repeat_interleave(batch // n, dim=0)


def _misaligned(signal: torch.Tensor, x: torch.Tensor, rule: str) -> ValueError:
    return ValueError(
        f"{ROUTER_INPUTS_KWARG} of shape {tuple(signal.shape)} does not line up with the routed input of shape "
        f"{tuple(x.shape)}: {rule} (see ilora.router.SignalRouter)"
    )


def check_ids_in_range(ids: torch.Tensor, upper: int, message: Callable[[str], str]) -> None:
    """Check ``0 <= ids < upper`` with ``torch._assert_async``: no device value is read back to the host.

    On CPU the assert runs at once and a failure raises ``ValueError(message(<the ids>))``; on an accelerator it
    runs on the device and a failure surfaces as a device-side assert carrying ``message("<on device>")`` at the next
    synchronising call, since ``int(ids.max())`` would stall every forward.
    """
    if not ids.numel():
        return
    in_range = ((ids >= 0) & (ids < upper)).all()
    if ids.device.type != "cpu":
        torch._assert_async(in_range, message("<on device>"))
        return
    try:
        torch._assert_async(in_range, "out of range")
    except RuntimeError as error:
        raise ValueError(message(str(ids.tolist()))) from error


@dataclass
class Gates:
    """Routing weights of one forward: dense ``[T, E]`` (soft) or ``weights``/``indices`` ``[T, k]`` (top-k)."""

    dense: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def to_dense(self, num_experts: int) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        assert self.weights is not None and self.indices is not None
        out = self.weights.new_zeros(self.weights.shape[0], num_experts)
        return out.scatter(1, self.indices, self.weights)


def gate(logits: torch.Tensor, routing: str, top_k: int, temperature: float) -> Gates:
    """Turn logits ``[T, E]`` into routing weights in ``routing_dtype`` (float32 or float64), autocast or not."""
    with no_autocast(logits.device):
        scaled = logits.to(routing_dtype(logits)) / temperature
        if routing == "soft":
            return Gates(dense=torch.softmax(scaled, dim=-1))
        probs = torch.softmax(scaled, dim=-1)
        values, indices = probs.topk(top_k, dim=-1)
        if top_k > 1:  # Mixtral: renormalize over the chosen experts
            values = values / values.sum(-1, keepdim=True)
    # top-1 keeps the router probability (Switch), else the weight would be a constant 1 and the router never learn.
    return Gates(weights=values, indices=indices)


def check_finite(logits: torch.Tensor, layer_name: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits)).any(-1).nonzero().flatten()[:8].tolist()
        raise FloatingPointError(
            f"router of {layer_name or 'an ilora layer'} produced non-finite logits (NaN or inf) for tokens {bad}: "
            "check the layer's input and the router weights"
        )
