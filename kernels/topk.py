"""Sparse top-k routed LoRA, ScatterMoE style: token ``t`` goes to experts ``indices[t]`` weighted by ``weights[t]``.

The ``T * k`` (token, expert) pairs are sorted by expert (stably). Only index tables are built: each block of
``BLOCK_M`` sorted pairs belongs to one expert, and the kernels gather the rows of ``x`` (or ``dy``, ``h``) they need
straight from the unsorted tensors, so no permuted copy of activations is made. The block table is sized by an upper
bound (``cdiv(T * k, BLOCK_M) + min(E, T * k)``) so building it needs no device-to-host sync; surplus blocks are
empty. On CPU, where reading the count costs nothing, the grid is exact.

Forward: a shared ``A`` shrinks densely (``h = x @ A_0``, ``[T, r]``); per-expert ``A`` shrinks per block into
``h[T * k, r]`` (pair order). The expand multiplies each block by its ``B_e``, applies ``scaling * weight`` in the
epilogue and adds rows into the output: a plain store (base fused) when ``k == 1``, else fp32 atomics into a buffer
that starts as the base. Saved for backward: ``x``, ``A``, ``B``, ``weights``, ``indices`` and ``h``; the sort is
recomputed.

Backward: one grouped kernel gives ``dh_pair = s * dy[t] @ B_e^T`` with ``dweight = <dh_pair, h>`` fused in its
epilogue, then ``dh_pair *= weight``; ``dB_e`` and (per-expert) ``dA_e`` are per-expert reductions over their pairs
(deterministic, one program per output tile); ``dx`` is a dense GEMM (shared ``A``) or a grouped scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..functional import check_expert_shapes
from ..functional import topk_routed_lora as _topk_math
from . import _utils, gemm
from ._utils import block, dot_args, kernel, sum_combine, tile_cap, tl, triton
from .availability import ensure_runnable


class _Plan(NamedTuple):
    token: torch.Tensor  # [P] token of each sorted pair
    order: torch.Tensor  # [P] pair id (t * k + j) of each sorted pair: row of per-pair tensors
    block_start: torch.Tensor  # [NB] first sorted pair of each block
    block_end: torch.Tensor  # [NB] end of that block's expert segment
    block_expert: torch.Tensor  # [NB]
    seg_start: torch.Tensor  # [E]
    seg_end: torch.Tensor  # [E]
    block_m: int


def _plan(indices: torch.Tensor, E: int, exact_grid: bool | None = None) -> _Plan:
    """Sort the pairs and cut them into blocks. ``exact_grid`` (default: on CPU, where reading a count costs no device
    sync) launches only the real blocks; otherwise the grid is the sync-free upper bound."""
    T, k = indices.shape
    P = T * k
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    seg_end = counts.cumsum(0)
    seg_start = seg_end - counts
    bm = block(triton.cdiv(P, E), tile_cap())
    blocks = (counts + bm - 1) // bm
    blocks_end = blocks.cumsum(0)
    if exact_grid is None:
        exact_grid = flat.device.type == "cpu"
    n_blocks = int(blocks_end[-1]) if exact_grid else triton.cdiv(P, bm) + min(E, P)
    b = torch.arange(n_blocks, device=flat.device)
    # Blocks past the last real one land on expert E-1 beyond its segment: an empty row range, so no valid mask.
    expert = torch.searchsorted(blocks_end, b, right=True).clamp_(max=E - 1)
    block_start = seg_start[expert] + (b - (blocks_end[expert] - blocks[expert])) * bm
    return _Plan(order // k, order, block_start, seg_end[expert], expert, seg_start, seg_end, bm)


@kernel
def _scatter_mm_kernel(
    x_ptr, x_idx_ptr, w_ptr, y_ptr, y_idx_ptr, pair_ptr, scale_ptr, base_ptr, h_ptr, h_idx_ptr, dw_ptr,
    block_start_ptr, block_end_ptr, block_expert_ptr,
    N, K, alpha,
    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_bm, s_bn, s_hm, s_hn,
    HAS_SCALE: tl.constexpr, HAS_BASE: tl.constexpr, ATOMIC: tl.constexpr, FUSE_DW: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``y[y_idx[p]] (+)= alpha * scale[pair[p]] * x[x_idx[p]] @ W_e`` for the sorted pairs ``p`` of one block."""
    pid = tl.program_id(0)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    e = tl.load(block_expert_ptr + pid)
    rows = start + tl.arange(0, BLOCK_M)
    m_mask = rows < end
    x_rows = tl.load(x_idx_ptr + rows, mask=m_mask, other=0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_e = w_ptr + e * s_we
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(
            x_ptr + x_rows[:, None] * s_xm + rk[None, :] * s_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(w_e + rk[:, None] * s_wk + rn[None, :] * s_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32).to(DOT), b.to(tl.float32).to(DOT), acc, input_precision=PRECISION)
    acc = acc * alpha
    mask = m_mask[:, None] & n_mask[None, :]
    pairs = tl.load(pair_ptr + rows, mask=m_mask, other=0)
    if FUSE_DW:  # needs the whole rank in this tile: the launcher sets BLOCK_N >= N
        h_rows = tl.load(h_idx_ptr + rows, mask=m_mask, other=0)
        h = tl.load(h_ptr + h_rows[:, None] * s_hm + rn[None, :] * s_hn, mask=mask, other=0.0)
        dw = tl.reduce(acc * h.to(tl.float32), 1, sum_combine)
        tl.store(dw_ptr + pairs, dw.to(dw_ptr.dtype.element_ty), mask=m_mask)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + pairs, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    y_rows = tl.load(y_idx_ptr + rows, mask=m_mask, other=0)
    y_off = y_rows[:, None] * s_ym + rn[None, :] * s_yn
    if ATOMIC:
        tl.atomic_add(y_ptr + y_off, acc, mask=mask)
    else:
        if HAS_BASE:
            acc += tl.load(base_ptr + y_rows[:, None] * s_bm + rn[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _scatter_mm(
    plan: _Plan,
    x: torch.Tensor,
    x_idx: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    y: torch.Tensor,
    y_idx: torch.Tensor,
    N: int,
    K: int,
    compute: torch.dtype,
    *,
    alpha: float = 1.0,
    scale: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    atomic: bool = False,
    dw: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch :func:`_scatter_mm_kernel`; ``w_strides`` are ``(expert, k, n)``, ``dw`` is ``(dw, h, h_idx)``."""
    n_blocks = plan.block_start.numel()
    if n_blocks == 0 or N == 0:
        return
    bn = block(N, triton.next_power_of_2(N)) if dw is not None else block(N, tile_cap())
    dw_t, h, h_idx = dw if dw is not None else (y, y, y_idx)
    scale_t = scale if scale is not None else y
    base_t = base if base is not None else y
    _scatter_mm_kernel[(n_blocks, triton.cdiv(N, bn))](
        x, x_idx, w, y, y_idx, plan.order, scale_t, base_t, h, h_idx, dw_t,
        plan.block_start, plan.block_end, plan.block_expert,
        N, K, float(alpha),
        *x.stride(), *w_strides, *y.stride(),
        *(base.stride() if base is not None else (0, 0)), *h.stride(),
        HAS_SCALE=scale is not None, HAS_BASE=base is not None, ATOMIC=atomic, FUSE_DW=dw is not None,
        **dot_args(compute), BLOCK_M=plan.block_m, BLOCK_N=bn, BLOCK_K=block(K, tile_cap() // 2),
    )  # fmt: skip


@kernel
def _grouped_outer_kernel(
    l_ptr, l_idx_ptr, r_ptr, r_idx_ptr, pair_ptr, scale_ptr, out_ptr, seg_start_ptr, seg_end_ptr,
    M, N, alpha,
    s_lm, s_lc, s_rm, s_rc, s_oe, s_om, s_on,
    HAS_SCALE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[e] = alpha * sum_p (scale[pair[p]] * l[l_idx[p]])^T r[r_idx[p]]`` over the sorted pairs of expert ``e``."""
    e = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    start = tl.load(seg_start_ptr + e)
    end = tl.load(seg_end_ptr + e)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for p0 in range(start, end, BLOCK_K):
        rows = p0 + tl.arange(0, BLOCK_K)
        p_mask = rows < end
        l_rows = tl.load(l_idx_ptr + rows, mask=p_mask, other=0)
        r_rows = tl.load(r_idx_ptr + rows, mask=p_mask, other=0)
        lt = tl.load(
            l_ptr + l_rows[None, :] * s_lm + rm[:, None] * s_lc, mask=m_mask[:, None] & p_mask[None, :], other=0.0
        )
        lt = lt.to(tl.float32)
        if HAS_SCALE:
            pairs = tl.load(pair_ptr + rows, mask=p_mask, other=0)
            lt = lt * tl.load(scale_ptr + pairs, mask=p_mask, other=0.0).to(tl.float32)[None, :]
        rt = tl.load(
            r_ptr + r_rows[:, None] * s_rm + rn[None, :] * s_rc, mask=p_mask[:, None] & n_mask[None, :], other=0.0
        )
        rt = rt.to(tl.float32)
        acc = tl.dot(lt.to(DOT), rt.to(DOT), acc, input_precision=PRECISION)
    out = out_ptr + e * s_oe + rm[:, None] * s_om + rn[None, :] * s_on
    tl.store(out, (acc * alpha).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _grouped_outer(
    plan: _Plan,
    l: torch.Tensor,
    l_idx: torch.Tensor,
    r: torch.Tensor,
    r_idx: torch.Tensor,
    out: torch.Tensor,
    compute: torch.dtype,
    *,
    alpha: float = 1.0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert ``l^T r`` reductions into ``out[E, M, N]`` (experts without pairs get zeros); returns ``out``."""
    E, M, N = out.shape
    if out.numel() == 0:
        return out
    cap = tile_cap()
    bm, bn = block(M, cap), block(N, cap)
    _grouped_outer_kernel[(E, triton.cdiv(M, bm), triton.cdiv(N, bn))](
        l, l_idx, r, r_idx, plan.order, scale if scale is not None else out, out, plan.seg_start, plan.seg_end,
        M, N, float(alpha),
        *l.stride(), *r.stride(), *out.stride(),
        HAS_SCALE=scale is not None, **dot_args(compute), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block(plan.block_m, cap),
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor) -> tuple[int, int, int, int]:
    E, r, d_in, d_out = check_expert_shapes(x, A, B)
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be [T={x.shape[0]}, k], got {tuple(indices.shape)}")
    return E, r, d_in, d_out


def _h_shape(x: torch.Tensor, A: torch.Tensor, indices: torch.Tensor) -> tuple[int, int]:
    """``h`` kept for backward: ``[T, r]`` for a shared ``A`` (indexed by token), else ``[T * k, r]`` by pair."""
    rows = x.shape[0] if A.shape[0] == 1 else indices.numel()
    return rows, A.shape[2]


def forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor | None,
    indices: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed output and ``h`` (see :func:`_h_shape`); ``weights=None`` means every weight is 1 (per-row routing)."""
    E, r, d_in, d_out = _check(x, A, B, indices)
    T, k = indices.shape
    weights = weights.contiguous() if weights is not None else None  # read at pair id t * k + j
    plan = _plan(indices, E)
    if A.shape[0] == 1:
        h, h_idx = gemm.shrink(x, A), plan.token
    else:
        h, h_idx = _utils.empty(_h_shape(x, A, indices), torch.float32, x.device), plan.order
        _scatter_mm(plan, x, plan.token, A, A.stride(), h, plan.order, r, d_in, x.dtype)
    expand = (plan, h, h_idx, B, B.stride())
    if k == 1:  # every token owns exactly one sorted row: store directly, base fused
        out = _utils.empty((T, d_out), x.dtype, x.device)
        _scatter_mm(*expand, out, plan.token, d_out, r, x.dtype, alpha=scaling, scale=weights, base=base)
        return out, h
    # k > 1: rows of one token come from several blocks, so accumulate atomically in fp32 (never into the caller's base)
    acc = base.to(torch.float32, copy=True) if base is not None else x.new_zeros(T, d_out, dtype=torch.float32)
    _scatter_mm(*expand, acc, plan.token, d_out, r, x.dtype, alpha=scaling, scale=weights, atomic=True)
    return acc.to(x.dtype), h


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor | None,
    indices: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dA, dB, dweights)`` from the output gradient; ``dweights`` is None when ``weights`` is None."""
    E, r, d_in, d_out = _check(x, A, B, indices)
    T, k = indices.shape
    weights = weights.contiguous() if weights is not None else None
    plan = _plan(indices, E)
    shared = A.shape[0] == 1
    h_idx = plan.token if shared else plan.order
    dh = _utils.empty((T * k, r), torch.float32, x.device)
    dw = _utils.empty((T, k), weights.dtype, x.device) if weights is not None else None
    _scatter_mm(
        plan, dy, plan.token, B, (B.stride(0), B.stride(2), B.stride(1)), dh, plan.order, r, d_out, x.dtype,
        alpha=scaling, scale=weights, dw=(dw, h, h_idx) if weights is not None else None,
    )  # fmt: skip
    dB = _utils.empty(tuple(B.shape), B.dtype, B.device)
    _grouped_outer(plan, h, h_idx, dy, plan.token, dB, x.dtype, alpha=scaling, scale=weights)
    if shared:
        dx, dA = gemm.shrink_backward(x, A, dh.view(T, k, r).sum(1), x.dtype)
        return dx, dA, dB, dw
    dA = _grouped_outer(plan, x, plan.token, dh, plan.order, _utils.empty(tuple(A.shape), A.dtype, A.device), x.dtype)
    A_t = (A.stride(0), A.stride(2), A.stride(1))
    if k == 1:
        dx = _utils.empty((T, d_in), x.dtype, x.device)
        _scatter_mm(plan, dh, plan.order, A, A_t, dx, plan.token, d_in, r, x.dtype)
        return dx, dA, dB, dw
    dx32 = x.new_zeros(T, d_in, dtype=torch.float32)
    _scatter_mm(plan, dh, plan.order, A, A_t, dx32, plan.token, d_in, r, x.dtype, atomic=True)
    return dx32.to(x.dtype), dA, dB, dw


@torch.library.custom_op("ilora::topk_routed_lora", mutates_args=())
def _topk_op(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if weights.shape != indices.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [T, k]")
    return forward(x, A, B, weights, indices, scaling, base)


@_topk_op.register_fake
def _(x, A, B, weights, indices, scaling, base):
    _, _, _, d_out = _check(x, A, B, indices)
    return x.new_empty(x.shape[0], d_out), x.new_empty(_h_shape(x, A, indices), dtype=torch.float32)


@torch.library.custom_op("ilora::topk_routed_lora_backward", mutates_args=())
def _topk_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dy, x, A, B, weights, indices, h, scaling)


@_topk_backward_op.register_fake
def _(dy, x, A, B, weights, indices, h, scaling):
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape), weights.new_empty(weights.shape)


_utils.register_routed_autograd(_topk_op, _topk_backward_op)


def topk_routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + scaling * sum_j weights[:, j] * (x @ A_e) @ B_e`` with ``e = indices[:, j]``, Triton kernels.

    Shapes: ``x [T, d_in]``, ``A [1 or E, d_in, r]``, ``B [E, r, d_out]``, ``weights`` and ``indices`` (int64)
    ``[T, k]``; returns ``[T, d_out]`` in ``x.dtype``. Differentiable in ``x``, ``A``, ``B``, ``weights``, ``base_out``.
    """
    ensure_runnable(x)
    return _topk_op(x, A, B, weights, indices, float(scaling), base_out)[0]


def topk_routed_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """PyTorch reference (``ilora.functional``), in fp32 when ``upcast``; the result is cast back to ``x.dtype``."""
    return _utils.reference(
        lambda x, A, B, w: _topk_math(x, A, B, w, indices, scaling), (x, A, B, weights), base_out, upcast
    )
