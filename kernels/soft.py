"""Dense (soft) routed LoRA, the Crab+ case: every expert weighted by ``gates[T, E]``.

Forward, two GEMMs (the strided GEMM of ``_utils``):

1. shrink for all experts in one pass: ``h = x @ A`` as ``[T, E_A * r]`` (``A[E_A, d_in, r]`` read in place);
2. expand with the gate folded into the operand load and the base added in the epilogue:
   ``y = base + s * (h * g)[T, E * r] @ B[E * r, d_out]`` (a shared ``h`` is broadcast over experts by a zero stride).

No per-expert ``[T, d_out]`` tensor exists. Saved for backward: ``x``, ``A``, ``B``, ``gates`` and ``h`` (fp32,
``[T, E_A * r]``, small since ``E * r`` is far below ``d_out``); no ``[T, d_out]`` tensor is kept.

Backward: ``dhg = s * dy @ B^T`` (``[T, E * r]``), ``dg[t, e] = sum_r dhg * h``, ``dh = dhg * g`` (summed over experts
when ``A`` is shared), ``dx = dh @ A^T``, ``dA = x^T @ dh``, ``dB = s * (h * g)^T @ dy``. The elementwise steps run on
``[T, E * r]`` tensors in PyTorch; every GEMM is a Triton kernel.
"""

from __future__ import annotations

import torch

from ..functional import check_expert_shapes
from ..functional import soft_routed_lora as _soft_math
from . import _utils, gemm
from .availability import ensure_runnable
from .gemm import matmul


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor) -> tuple[int, int, int, int]:
    E, r, d_in, d_out = check_expert_shapes(x, A, B)
    if gates.shape != (x.shape[0], E):
        raise ValueError(f"gates must be [T={x.shape[0]}, E={E}], got {tuple(gates.shape)}")
    return E, r, d_in, d_out


def _forward(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float, base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, _, d_out = _check(x, A, B, gates)
    T = x.shape[0]
    h = gemm.shrink(x, A)
    shared = A.shape[0] == 1
    out = _utils.empty((T, d_out), x.dtype, x.device)
    matmul(
        h, (h.stride(0), 0 if shared else r, 1),
        B, (B.stride(0), B.stride(1), B.stride(2), 0),
        out, (out.stride(0), out.stride(1), 0),
        T, d_out, E * r, rk=r, alpha=scaling, gate=gates, base=base, compute=x.dtype,
    )  # fmt: skip
    return out, h


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    E, r, _, d_out = _check(x, A, B, gates)
    T, E_A = x.shape[0], A.shape[0]
    dhg = _utils.empty((T, E * r), torch.float32, x.device)
    matmul(
        dy, (dy.stride(0), dy.stride(1), 0),
        B, (B.stride(2), 0, B.stride(0), B.stride(1)),
        dhg, (dhg.stride(0), r, 1),
        T, E * r, d_out, rn=r, alpha=scaling, compute=x.dtype,
    )  # fmt: skip
    dhg = dhg.view(T, E, r)
    h3 = h.view(T, E_A, r)
    g = gates.float().unsqueeze(-1)
    dgates = (dhg * h3).sum(-1).to(gates.dtype)
    dh = dhg * g
    dh = (dh.sum(1) if E_A == 1 else dh).reshape(T, E_A * r)
    dx, dA = gemm.shrink_backward(x, A, dh, x.dtype)
    hg = (h3 * g).reshape(T, E * r)
    dB = _utils.empty(tuple(B.shape), B.dtype, B.device)
    matmul(
        hg, (1, hg.stride(0), 0),
        dy, (dy.stride(0), 0, dy.stride(1), 0),
        dB, (dB.stride(1), dB.stride(2), 0),
        E * r, d_out, T, alpha=scaling, compute=x.dtype,
    )  # fmt: skip
    return dx, dA, dB, dgates


_soft_op = torch.library.custom_op("ilora::soft_routed_lora", _forward, mutates_args=())


@_soft_op.register_fake
def _(x, A, B, gates, scaling, base):
    _, r, _, d_out = _check(x, A, B, gates)
    return x.new_empty(x.shape[0], d_out), x.new_empty(x.shape[0], A.shape[0] * r, dtype=torch.float32)


_soft_backward_op = torch.library.custom_op("ilora::soft_routed_lora_backward", _backward, mutates_args=())


@_soft_backward_op.register_fake
def _(dy, x, A, B, gates, h, scaling):
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape), gates.new_empty(gates.shape)


_utils.register_routed_autograd(_soft_op, _soft_backward_op)


def soft_routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + scaling * sum_e gates[:, e] * (x @ A_e) @ B_e`` with Triton kernels (``A`` shared or per expert).

    Shapes: ``x [T, d_in]``, ``A [1 or E, d_in, r]``, ``B [E, r, d_out]``, ``gates [T, E]``; returns ``[T, d_out]``
    in ``x.dtype``. Differentiable in ``x``, ``A``, ``B``, ``gates`` and ``base_out``.
    """
    ensure_runnable(x)
    return _soft_op(x, A, B, gates, float(scaling), base_out)[0]


def soft_routed_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """PyTorch reference (``ilora.functional``), in fp32 when ``upcast``; the result is cast back to ``x.dtype``."""
    return _utils.reference(lambda x, A, B, g: _soft_math(x, A, B, g, scaling), (x, A, B, gates), base_out, upcast)
