"""The strided GEMM behind soft routing and the shared-A shrink, with its autotune table for the compiled path.

It computes ``c[M, N] = alpha * (a[M, K] * gate) @ b[K, N] (+ base)`` in fp32. Its K and N axes may be *stacked
experts*: index ``i`` addresses ``(i // R) * outer + (i % R) * inner``. That reads ``A[E_A, d_in, r]`` as a
``[d_in, E_A * r]`` matrix (and its transpose) without a copy, and with ``outer = 0`` broadcasts one shared ``h[T, r]``
over all experts. The optional gate multiplies ``a[m, k]`` by ``gate[m, k // R]``: the per-token expert weight.
Nothing is saved here; the op files decide what autograd keeps.
"""

from __future__ import annotations

import torch

from . import _utils
from ._utils import block, dot_args, kernel, tile_cap, tl, triton

# Compiled-path tiles for the strided GEMM, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the fixed tile of
# the first kernels (64, 64, 32), then the larger warpgroup-MMA tiles that large bf16 GEMMs on Hopper favour.
MM_CONFIGS = (
    (64, 64, 32, 4, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
)


def _prune_mm_configs(configs, named_args, **constexprs):
    """The first config, plus the larger tiles that fit inside the problem (beyond it they only add masked work).
    fp32 operands keep the first tile: their larger tiles spill registers on sm_90 (tests/kernels/test_sm90_build)."""
    if constexprs.get("DOT") in (tl.float32, "fp32"):
        return [configs[0]]
    size = {f"BLOCK_{d}": triton.next_power_of_2(named_args[d]) for d in ("M", "N", "K")}
    return [configs[0], *(c for c in configs[1:] if all(c.kwargs[b] <= n for b, n in size.items()))]


@kernel.with_configs(
    MM_CONFIGS,
    key=["M_BUCKET", "N", "K", "RK", "RN", "HAS_GATE", "HAS_BASE"],
    prune=_prune_mm_configs,
    do_not_specialize=["M_BUCKET"],
)
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, g_ptr, base_ptr,
    M, N, K, RK, RN, alpha, M_BUCKET,
    s_am, s_ak_o, s_ak_i,
    s_bk_o, s_bk_i, s_bn_o, s_bn_i,
    s_cm, s_cn_o, s_cn_i,
    s_gm, s_ge, s_basem, s_basen,
    HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # int64 rows and K indices: token offsets (T * d) can pass 2**31 on long batches
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    b_n = (rn // RN) * s_bn_o + (rn % RN) * s_bn_i
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = rk < K
        ke = rk // RK
        kr = rk % RK
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + rm[:, None] * s_am + (ke * s_ak_o + kr * s_ak_i)[None, :], mask=a_mask, other=0.0)
        a = a.to(tl.float32)
        if HAS_GATE:
            g = tl.load(g_ptr + rm[:, None] * s_gm + ke[None, :] * s_ge, mask=a_mask, other=0.0)
            a = a * g.to(tl.float32)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b = tl.load(b_ptr + (ke * s_bk_o + kr * s_bk_i)[:, None] + b_n[None, :], mask=b_mask, other=0.0)
        b = b.to(tl.float32)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
    acc = acc * alpha
    c_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + rm[:, None] * s_basem + rn[None, :] * s_basen, mask=c_mask, other=0.0)
        acc += base.to(tl.float32)
    c_n = (rn // RN) * s_cn_o + (rn % RN) * s_cn_i
    tl.store(c_ptr + rm[:, None] * s_cm + c_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul(
    a: torch.Tensor,
    a_strides: tuple[int, int, int],
    b: torch.Tensor,
    b_strides: tuple[int, int, int, int],
    c: torch.Tensor,
    c_strides: tuple[int, int, int],
    M: int,
    N: int,
    K: int,
    *,
    rk: int = 1,
    rn: int = 1,
    alpha: float = 1.0,
    gate: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Write ``alpha * (a * gate) @ b + base`` into ``c``; returns ``c``.

    Strides: ``a`` as ``(m, k_outer, k_inner)``, ``b`` as ``(k_outer, k_inner, n_outer, n_inner)``, ``c`` as
    ``(m, n_outer, n_inner)``, where a stacked index ``i`` of the K (or N) axis addresses
    ``(i // rk) * outer + (i % rk) * inner`` (``rn`` for N); a plain axis passes ``r = 1`` and ``inner = 0``.
    ``gate`` is ``[M, K // rk]``, ``base`` ``[M, N]``; ``compute`` is the input dtype that picks :func:`dot_args`.
    """
    if M == 0 or N == 0:
        return c
    cap = tile_cap()
    tile = (block(M, cap), block(N, cap), block(K, cap // 2))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    # Problems that fill the first config's tile are autotuned on the GPU (that tile is one candidate), keyed on M's
    # power-of-two bucket so a new token count does not start a new search; smaller ones keep the fitted tile.
    autotune = not _utils.interpreting() and tile == MM_CONFIGS[0][:3]
    tiles = {} if autotune else dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile))
    launch = _mm_kernel.tuned[grid] if autotune else _mm_kernel[grid]
    dummy = c
    gate_t = gate if gate is not None else dummy
    base_t = base if base is not None else dummy
    launch(
        a, b, c, gate_t, base_t,
        M, N, K, rk, rn, float(alpha), triton.next_power_of_2(M),
        *a_strides, *b_strides, *c_strides,
        *(gate.stride() if gate is not None else (0, 0)),
        *(base.stride() if base is not None else (0, 0)),
        HAS_GATE=gate is not None, HAS_BASE=base is not None, **dot_args(compute), **tiles,
    )  # fmt: skip
    return c


def shrink(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``h[T, E_A * r] = x @ A_e`` for every expert of ``A[E_A, d_in, r]`` in one GEMM, kept in fp32."""
    T, d_in = x.shape
    E_A, _, r = A.shape
    h = _utils.empty((T, E_A * r), torch.float32, x.device)
    return matmul(
        x, (x.stride(0), x.stride(1), 0),
        A, (A.stride(1), 0, A.stride(0), A.stride(2)),
        h, (h.stride(0), r, 1),
        T, E_A * r, d_in, rn=r, compute=x.dtype,
    )  # fmt: skip


def shrink_backward(
    x: torch.Tensor, A: torch.Tensor, dh: torch.Tensor, compute: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`shrink` from ``dh[T, E_A * r]`` (contiguous): ``dx = dh @ A^T`` and ``dA = x^T @ dh``."""
    T, d_in = x.shape
    E_A, _, r = A.shape
    dx = _utils.empty((T, d_in), x.dtype, x.device)
    matmul(
        dh, (dh.stride(0), r, 1),
        A, (A.stride(0), A.stride(2), A.stride(1), 0),
        dx, (dx.stride(0), dx.stride(1), 0),
        T, d_in, E_A * r, rk=r, compute=compute,
    )  # fmt: skip
    dA = _utils.empty(tuple(A.shape), A.dtype, A.device)
    matmul(
        x, (x.stride(1), x.stride(0), 0),
        dh, (dh.stride(0), 0, r, 1),
        dA, (dA.stride(1), dA.stride(0), dA.stride(2)),
        d_in, E_A * r, T, rn=r, compute=compute,
    )  # fmt: skip
    return dx, dA
