"""Per-row routed LoRA: one expert per row (task routing, serving), Punica BGMV style for decode-sized batches.

Forward for ``T <= PER_ROW_MAX_TOKENS`` (64, ``ilora.paths``) rows, two kernels:

1. shrink: one program per (row, chunk of ``d_in``) computes ``x[t] @ A_{e_t}`` for its chunk; chunks are added
   with fp32 atomics when ``d_in`` spans several (split-K keeps a few decode rows from idling the GPU), else stored;
2. expand: one program per (row, tile of ``d_out``): ``y[t] = base[t] + s * h[t] @ B_{e_t}``.

A shared ``A`` reads expert 0 for every row through a zero expert stride. Larger batches take the grouped top-k path
with ``k = 1`` (rows sorted by expert), where each expert's weights are read once per block instead of once per row.
Saved for backward: ``x``, ``A``, ``B``, ``expert_ids`` and ``h`` (fp32, ``[T, r]``). The backward is the top-k one
with ``k = 1`` and unit weights: training batches are large, which is the grouped layout's case.
"""

from __future__ import annotations

import torch

from ..functional import check_expert_shapes
from ..functional import per_row_routed_lora as _per_row_math
from ..paths import PER_ROW_MAX_TOKENS
from . import _utils, topk
from ._utils import block, interpreting, kernel, sum_combine, tl, triton
from .availability import ensure_runnable


@kernel
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, ids_ptr, h_ptr,
    K, R, CHUNK,
    s_xm, s_xk, s_ae, s_ak, s_ar, s_hm,
    SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    k_lo = tl.program_id(1) * CHUNK
    e = tl.load(ids_ptr + t)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    for k0 in range(k_lo, k_lo + CHUNK, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xv = tl.load(x_ptr + t * s_xm + rk * s_xk, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(
            a_ptr + e * s_ae + rk[:, None] * s_ak + rr[None, :] * s_ar,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc += tl.reduce(xv[:, None] * av.to(tl.float32), 0, sum_combine)
    if SPLIT:
        tl.atomic_add(h_ptr + t * s_hm + rr, acc, mask=r_mask)
    else:
        tl.store(h_ptr + t * s_hm + rr, acc, mask=r_mask)


@kernel
def _bgmv_expand_kernel(
    h_ptr, b_ptr, ids_ptr, base_ptr, y_ptr,
    N, R, alpha,
    s_hm, s_be, s_br, s_bn, s_basem, s_basen, s_ym, s_yn,
    HAS_BASE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    e = tl.load(ids_ptr + t)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    hv = tl.load(h_ptr + t * s_hm + rr, mask=r_mask, other=0.0)
    bv = tl.load(
        b_ptr + e * s_be + rr[:, None] * s_br + rn[None, :] * s_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0
    )
    acc = tl.reduce(hv[:, None] * bv.to(tl.float32), 0, sum_combine) * alpha
    if HAS_BASE:
        acc += tl.load(base_ptr + t * s_basem + rn * s_basen, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * s_ym + rn * s_yn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor) -> tuple[int, int, int, int]:
    E, r, d_in, d_out = check_expert_shapes(x, A, B)
    if expert_ids.shape != (x.shape[0],):
        raise ValueError(f"expert_ids must be [T={x.shape[0]}], got {tuple(expert_ids.shape)}")
    return E, r, d_in, d_out


def _forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, d_in, d_out = _check(x, A, B, expert_ids)
    T = x.shape[0]
    if T > PER_ROW_MAX_TOKENS:
        return topk.forward(x, A, B, None, expert_ids.unsqueeze(1), scaling, base)
    # An out-of-range id would read another expert's memory: fail (asynchronously on CUDA, without a host sync).
    torch._assert_async(((expert_ids >= 0) & (expert_ids < E)).all(), "expert_ids out of range")
    out = _utils.empty((T, d_out), x.dtype, x.device)
    if T == 0:
        return out, x.new_empty(0, r, dtype=torch.float32)
    block_r = block(r, triton.next_power_of_2(r))
    block_k = 128 if interpreting() else 64
    chunk = block_k * 8
    n_chunks = triton.cdiv(d_in, chunk)
    h = x.new_zeros(T, r, dtype=torch.float32) if n_chunks > 1 else _utils.empty((T, r), torch.float32, x.device)
    _bgmv_shrink_kernel[(T, n_chunks)](
        x, A, expert_ids, h,
        d_in, r, chunk,
        *x.stride(), A.stride(0) if A.shape[0] > 1 else 0, A.stride(1), A.stride(2), h.stride(0),
        SPLIT=n_chunks > 1, BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip
    block_n = 128 if interpreting() else 64
    _bgmv_expand_kernel[(T, triton.cdiv(d_out, block_n))](
        h, B, expert_ids, base if base is not None else out, out,
        d_out, r, float(scaling),
        h.stride(0), *B.stride(), *(base.stride() if base is not None else (0, 0)), *out.stride(),
        HAS_BASE=base is not None, BLOCK_R=block_r, BLOCK_N=block_n,
    )  # fmt: skip
    return out, h


@torch.library.custom_op("ilora::per_row_routed_lora", mutates_args=())
def _per_row_op(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, A, B, expert_ids, scaling, base)


@_per_row_op.register_fake
def _(x, A, B, expert_ids, scaling, base):
    _, r, _, d_out = _check(x, A, B, expert_ids)
    return x.new_empty(x.shape[0], d_out), x.new_empty(x.shape[0], r, dtype=torch.float32)


@torch.library.custom_op("ilora::per_row_routed_lora_backward", mutates_args=())
def _per_row_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB, _ = topk.backward(dy, x, A, B, None, expert_ids.unsqueeze(1), h, scaling)
    return dx, dA, dB


@_per_row_backward_op.register_fake
def _(dy, x, A, B, expert_ids, h, scaling):
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)


_utils.register_routed_autograd(_per_row_op, _per_row_backward_op)


def per_row_routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out[t] + scaling * (x[t] @ A_e) @ B_e`` with ``e = expert_ids[t]`` (int64 ``[T]``), Triton kernels.

    ``A`` is ``[1 or E, d_in, r]``, ``B`` ``[E, r, d_out]``; returns ``[T, d_out]`` in ``x.dtype``. Differentiable in
    ``x``, ``A``, ``B`` and ``base_out``.
    """
    ensure_runnable(x)
    return _per_row_op(x, A, B, expert_ids, float(scaling), base_out)[0]


def per_row_routed_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """PyTorch reference (``ilora.functional``), in fp32 when ``upcast``; the result is cast back to ``x.dtype``."""
    return _utils.reference(lambda x, A, B: _per_row_math(x, A, B, expert_ids, scaling), (x, A, B), base_out, upcast)
