"""Which compute path runs a routed layer's adapter, and running it.

:func:`select_path` is the one place that decides, from plain facts (config, gate kind, token count, what the device
offers), and it owns the thresholds. :func:`add_routed_lora` gathers those facts for a call, logs once when
``use_kernels="auto"`` keeps a GPU on PyTorch, and runs the chosen op:

================  ==========================================  ============================================
path              op                                          when
================  ==========================================  ============================================
torch_soft        ``ilora.functional.soft_routed_lora``        PyTorch, dense gates
torch_topk        ``ilora.functional.topk_routed_lora``        PyTorch, top-k gates (grouped GEMMs where
                                                              ``functional.grouped_mm_supported``, else a
                                                              loop over experts)
triton_dense      ``ilora.kernels.soft_routed_lora``           Triton, dense gates; or top-k over few small
                                                              experts, the unselected gates zero
triton_per_row    ``ilora.kernels.per_row_routed_lora``        Triton, top-1 decode batches
triton_sorted     ``ilora.kernels.topk_routed_lora``           Triton, other top-k
torch_per_expert  ``ilora.functional.per_expert_input_``       PyTorch, dense gates and one input per expert
_input            ``routed_lora``                              (per-expert dropout while training, Crab): no
                                                              kernel, so ``use_kernels="triton"`` refuses it
================  ==========================================  ============================================

Triton runs when ``use_kernels="triton"`` (an error if it cannot run here), or under ``"auto"`` on a CUDA device
whose (GPU vendor and architecture, Triton version, kernel sources) is validated (``ilora/kernels/validated.py``).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import torch

from . import functional
from .config import ILoraConfig
from .router import Gates

logger = logging.getLogger(__name__)

# Decode-sized top-1 batches go to the per-row (BGMV-style) kernel; beyond this, sorting tokens by expert pays off.
PER_ROW_MAX_TOKENS = 64
# Top-k routing over few, small experts runs the dense kernel with the unselected gates zero: it computes (E - k) * r
# extra rank per token but needs no sort, no atomics and no fp32 [T, d_out] buffer. By rates alone (an H100/H200's
# ~600 TFLOP/s of bf16 GEMM against ~4 TB/s for the sparse path's three fp32 [T, d_out] passes) the dense extra stays
# cheaper up to roughly (E - k) * r = 375; this bound leaves a margin until GPU runs place it.
DENSE_TOPK_MAX_EXTRA_RANK = 256


class ComputePath(enum.Enum):
    TORCH_SOFT = "torch_soft"
    TORCH_TOPK = "torch_topk"
    TORCH_PER_EXPERT_INPUT = "torch_per_expert_input"
    TRITON_DENSE = "triton_dense"
    TRITON_PER_ROW = "triton_per_row"
    TRITON_SORTED = "triton_sorted"


@dataclass(frozen=True)
class DeviceFacts:
    """What the input's device offers the Triton kernels."""

    type: str  # torch.device.type: "cuda", "cpu", ...
    triton_runnable: bool  # triton imports and runs here (CUDA, or CPU under TRITON_INTERPRET=1)
    triton_validated: bool = False  # a recorded kernel-check run passed on this GPU arch and Triton version
    target: str = ""  # "cuda sm_90 with Triton 3.9": named in messages
    problem: str = ""  # why use_kernels="auto" keeps this GPU on PyTorch (kernels.validated.validation_problem)


@dataclass(frozen=True)
class Choice:
    path: ComputePath
    note: str | None = None  # the line logged once per reason: why "auto" runs PyTorch where Triton runs, the way out
    reason: str | None = None  # that reason alone (benchmark provider notes carry it)


GATES_KINDS = ("dense", "topk", "per_expert_input")
# The dtypes the Triton kernels take (``kernels/_utils.py``); others run on PyTorch.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_refusal(gates_kind: str, dtype: torch.dtype | None = None) -> str | None:
    """Why no Triton kernel takes a call with these gates and adapter ``dtype``, or None when one does."""
    if gates_kind == "per_expert_input":
        return (
            "no Triton kernel for per-expert dropout (dropout_per_expert=True with lora_dropout > 0, while "
            "training): every expert reads its own input"
        )
    if dtype is not None and dtype not in TRITON_DTYPES:
        return (
            f"no Triton kernel for {str(dtype).removeprefix('torch.')} adapters (they take float32, float16, bfloat16)"
        )
    return None


def select_path(
    config: ILoraConfig,
    gates_kind: str,
    tokens: int,
    device: DeviceFacts,
    slots: int | None = None,
    dtype: torch.dtype | None = None,
) -> Choice:
    """The compute path for one call: ``gates_kind`` is ``"dense"`` (soft), ``"topk"``, or ``"per_expert_input"``
    (dense gates, each expert reading its own input: per-expert dropout while training); ``tokens`` the rows;
    ``slots`` the experts per token the gate returned for top-k (a user's gate may return other than
    ``config.top_k``; default ``config.top_k``); ``dtype`` the adapter's (default: one the kernels take).

    Where ``use_kernels="auto"`` would run Triton (a CUDA device where it runs) but PyTorch runs, the choice carries
    the ``reason`` (the GPU is not validated, or no kernel takes these gates or dtype, see ``triton_refusal``) and
    the ``note`` to log once. Raises ``RuntimeError`` when ``use_kernels="triton"`` and Triton cannot run on the
    device or has no kernel for the call, ``ValueError`` for an unknown ``gates_kind``.
    """
    if gates_kind not in GATES_KINDS:
        raise ValueError(f"gates_kind must be 'dense', 'topk' or 'per_expert_input', got {gates_kind!r}")
    torch_path = {"dense": ComputePath.TORCH_SOFT, "topk": ComputePath.TORCH_TOPK}.get(
        gates_kind, ComputePath.TORCH_PER_EXPERT_INPUT
    )
    refusal = triton_refusal(gates_kind, dtype)
    if config.use_kernels == "triton":
        if refusal is not None:
            raise RuntimeError(
                f"use_kernels='triton' but there is {refusal}: use use_kernels='auto' or 'torch' to run it on the "
                "PyTorch path" + (", or set dropout_per_expert=False (one dropout mask shared by the experts)"
                                  if gates_kind == "per_expert_input" else "")
            )  # fmt: skip
        if not device.triton_runnable:
            raise RuntimeError(
                f"use_kernels='triton' but Triton cannot run on {device.type} tensors here: install triton "
                "(pip install 'ilora[triton]'), use a CUDA device, or set TRITON_INTERPRET=1 for CPU tensors"
            )
        return Choice(_triton_path(config, gates_kind, tokens, slots))
    if config.use_kernels != "auto" or device.type != "cuda" or not device.triton_runnable:
        return Choice(torch_path)
    if refusal is not None:
        return Choice(torch_path, f"ilora: {refusal}, so this layer runs the PyTorch path", refusal)
    if device.triton_validated:
        return Choice(_triton_path(config, gates_kind, tokens, slots))
    problem = device.problem or f"the Triton kernels are not validated on {device.target or 'this GPU'}"
    note = (
        f"ilora: {problem}, so use_kernels='auto' "
        "runs the PyTorch path. To use them anyway pass use_kernels='triton'; to validate this GPU run "
        "`python -m benchmarks.kernel_check` and open a PR with its record (README, 'Kernels')."
    )
    return Choice(torch_path, note, problem)


def _triton_path(config: ILoraConfig, gates_kind: str, tokens: int, slots: int | None) -> ComputePath:
    if gates_kind == "dense":
        return ComputePath.TRITON_DENSE
    k = config.top_k if slots is None else slots
    if k == 1 and tokens <= PER_ROW_MAX_TOKENS:
        return ComputePath.TRITON_PER_ROW
    if (config.num_experts - k) * config.r <= DENSE_TOPK_MAX_EXTRA_RANK:
        return ComputePath.TRITON_DENSE
    return ComputePath.TRITON_SORTED


def device_facts(x: torch.Tensor) -> DeviceFacts:
    """The facts :func:`select_path` needs about ``x``'s device (imports ``ilora.kernels``, which needs no triton)."""
    from ilora.kernels import availability

    runnable = availability.triton_runnable(x)
    if x.device.type != "cuda" or not runnable:
        return DeviceFacts(x.device.type, runnable)
    target = availability.gpu_target(x.device)
    return DeviceFacts("cuda", True, target.problem is None, target.name, target.problem or "")


_logged: set[str | None] = set()


def add_routed_lora(
    config: ILoraConfig,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: Gates,
    scaling: float,
    result: torch.Tensor,
) -> torch.Tensor:
    """``result + scaling * sum_e g_e (x A_e) B_e`` on the path :func:`select_path` picks.

    ``x [T, d_in]`` (dropout applied), or ``[T, E, d_in]`` with one input per expert (per-expert dropout),
    ``A [1 or E, d_in, r]``, ``B [E, r, d_out]``, ``gates`` of ``T`` rows, ``result [..., d_out]`` the base layer's
    output; returns ``result``'s shape and dtype.
    """
    kind = "per_expert_input" if x.dim() == 3 else "dense" if gates.dense is not None else "topk"
    slots = None if gates.weights is None else gates.weights.shape[-1]
    choice = select_path(config, kind, x.shape[0], device_facts(x), slots, A.dtype)
    if choice.note is not None and choice.reason not in _logged:  # once per reason and process
        _logged.add(choice.reason)
        logger.warning(choice.note)
    x2, base2 = x.to(A.dtype), result.reshape(-1, B.shape[2])
    if choice.path is ComputePath.TORCH_PER_EXPERT_INPUT:
        dense = gates.to_dense(config.num_experts).to(A.dtype)
        out = functional.per_expert_input_routed_lora(x2, A, B, dense, scaling)
        return (base2 + out.to(base2.dtype)).view_as(result)
    if choice.path in (ComputePath.TORCH_SOFT, ComputePath.TORCH_TOPK):
        return _torch_path(x2, A, B, gates, scaling, base2).to(result.dtype).view_as(result)
    from ilora import kernels

    base = base2.to(A.dtype)
    if choice.path is ComputePath.TRITON_DENSE:
        dense = gates.to_dense(config.num_experts).to(A.dtype)
        out = kernels.soft_routed_lora(x2, A, B, dense, scaling, base_out=base)
    elif choice.path is ComputePath.TRITON_PER_ROW:
        # One expert per row: fold its weight into the row, (w x) A B = w (x A B).
        w = gates.weights.to(A.dtype)
        out = kernels.per_row_routed_lora(x2 * w, A, B, gates.indices[:, 0], scaling, base_out=base)
    else:
        w, idx = gates.weights.to(A.dtype), gates.indices
        out = kernels.topk_routed_lora(x2, A, B, w, idx, scaling, base_out=base)
    return out.to(result.dtype).view_as(result)


def _torch_path(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: Gates, scaling: float, base: torch.Tensor
) -> torch.Tensor:
    """The PyTorch ops, with the residual add fused when the base output has the adapter's dtype."""
    fused = base.dtype == A.dtype
    if gates.dense is not None:
        out = functional.soft_routed_lora(x, A, B, gates.dense.to(A.dtype), scaling, base if fused else None)
    else:
        w = gates.weights.to(A.dtype)
        out = functional.topk_routed_lora(x, A, B, w, gates.indices, scaling, base if fused else None)
    return out if fused else base + out.to(base.dtype)
