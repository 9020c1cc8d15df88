"""Routed-LoRA math in pure PyTorch: the CPU path and the reference the Triton kernels are tested against.

Shapes (the layer's stacked layout, see README "State-dict layout"):

- ``x``:       ``[T, d_in]`` tokens (callers flatten leading dimensions)
- ``A``:       ``[E_A, d_in, r]`` with ``E_A == 1`` (one A shared by all experts) or ``E_A == E``
- ``B``:       ``[E, r, d_out]``
- ``gates``:   ``[T, E]`` dense routing weights (soft routing)
- ``weights``, ``indices``: ``[T, k]`` top-k routing weights and expert ids

The adapter's contribution is ``delta = scaling * sum_e g_e(x) * (x @ A_e) @ B_e``. Nothing here knows about
modules, PEFT or routers: gates come in already computed.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "check_expert_shapes",
    "grouped_mm_supported",
    "per_expert_input_routed_lora",
    "per_row_routed_lora",
    "soft_routed_lora",
    "topk_routed_lora",
]


def check_expert_shapes(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the stacked-expert shapes against ``x``; returns ``(E, r, d_in, d_out)``."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, d_in], got shape {tuple(x.shape)}")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A must be [E_A, d_in, r] and B [E, r, d_out], got {tuple(A.shape)} and {tuple(B.shape)}")
    E, r, d_out = B.shape
    if A.shape[0] not in (1, E):
        raise ValueError(f"A holds {A.shape[0]} experts; expected 1 (shared) or {E} (one per expert of B)")
    if A.shape[2] != r:
        raise ValueError(f"rank mismatch: A has r={A.shape[2]}, B has r={r}")
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"input width {x.shape[1]} does not match the adapter's d_in={A.shape[1]}")
    return E, r, A.shape[1], d_out


def _shrink_all(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x @ A_e`` for every expert in one matmul: ``[T, E_A, r]``."""
    E_A, d_in, r = A.shape
    if E_A == 1:
        return (x @ A[0]).unsqueeze(1)
    return (x @ A.permute(1, 0, 2).reshape(d_in, E_A * r)).view(-1, E_A, r)


def soft_routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense (soft) routing: every expert weighted by ``gates[T, E]``. Returns ``delta [T, d_out]``, or
    ``base_out + delta`` when ``base_out`` is given (the add fused into the expand GEMM: one pass less over the
    ``[T, d_out]`` output).

    One shrink matmul for all experts, then ``(h * g)`` flattened to ``[T, E*r]`` against ``B`` viewed as
    ``[E*r, d_out]``: one expand matmul, no per-expert ``[T, d_out]`` tensor.
    """
    E, r, _, d_out = check_expert_shapes(x, A, B)
    if gates.shape != (x.shape[0], E):
        raise ValueError(f"gates must be [T={x.shape[0]}, E={E}], got {tuple(gates.shape)}")
    h = _shrink_all(x, A)  # [T, E_A, r]; broadcasts over experts when A is shared
    # Scaling folded into the [T, E] gates rather than applied to the [T, d_out] output: one small multiply.
    hg = (h * (gates.to(h.dtype) * scaling).unsqueeze(-1)).reshape(x.shape[0], E * r)
    if base_out is None:
        return hg @ B.reshape(E * r, d_out)
    if base_out.shape != (x.shape[0], d_out) or base_out.dtype != hg.dtype:
        raise ValueError(f"base_out must be [T={x.shape[0]}, {d_out}] of {hg.dtype}, got {tuple(base_out.shape)} "
                         f"of {base_out.dtype}")  # fmt: skip
    return torch.addmm(base_out, hg, B.reshape(E * r, d_out))


def per_expert_input_routed_lora(
    xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Dense routing where expert ``e`` reads its own input ``xs[:, e]`` (``xs [T, E, d_in]``; Crab's dropout mask per
    expert): ``delta [T, d_out] = scaling * sum_e g_e (xs_e A_e) B_e``. One batched shrink, one expand matmul."""
    if xs.dim() != 3:
        raise ValueError(f"xs must be 3-D [tokens, experts, d_in], got shape {tuple(xs.shape)}")
    E, r, _, d_out = check_expert_shapes(xs[:, 0], A, B)
    T = xs.shape[0]
    if xs.shape[1] != E or gates.shape != (T, E):
        raise ValueError(
            f"xs must be [T, E={E}, d_in] and gates [T, E], got {tuple(xs.shape)} and {tuple(gates.shape)}"
        )
    h = torch.einsum("ted,edr->ter", xs, A.expand(E, -1, -1))
    hg = (h * (gates.to(h.dtype) * scaling).unsqueeze(-1)).reshape(T, E * r)
    return hg @ B.reshape(E * r, d_out)


def topk_routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse routing: token ``t`` goes to experts ``indices[t]`` weighted by ``weights[t]``. Returns ``delta``, or
    ``base_out + delta`` when ``base_out`` is given (the add fused into the scatter of the expert rows).

    Where :func:`grouped_mm_supported` holds, (token, expert) pairs are sorted by expert so each expert multiplies one
    contiguous block of rows in two grouped GEMMs; elsewhere (other dtypes or devices, unaligned widths, under
    ``torch.compile`` on CPU) the gates are scattered to dense ``[T, E]`` and :func:`soft_routed_lora` runs: the
    same sum, with E/k times the adapter FLOPs. No Python loop over experts and no host sync either way. Expert ids
    are range-checked on the device (``torch._assert_async``), never read back on the host. Sorted rows move with
    ``index_select`` and an ``index_add`` whose backward keeps only the index (see benchmarks/README "The sparse path
    on CPU").
    """
    E, _, _, d_out = check_expert_shapes(x, A, B)
    T = x.shape[0]
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != T:
        raise ValueError(
            f"weights and indices must both be [T={T}, k], got {tuple(weights.shape)} and {tuple(indices.shape)}"
        )
    if base_out is not None and (base_out.shape != (T, d_out) or base_out.dtype != x.dtype):
        raise ValueError(f"base_out must be [T={T}, {d_out}] of {x.dtype}, got {tuple(base_out.shape)} "
                         f"of {base_out.dtype}")  # fmt: skip
    flat = indices.reshape(-1)
    torch._assert_async(((flat >= 0) & (flat < E)).all(), f"top-k indices must name experts in [0, {E})")
    if not grouped_mm_supported(x, A, B):
        # No grouped GEMM: every expert for every token in two dense GEMMs, the unselected gates zero (a duplicated
        # index adds its weights, as the sorted sum does). E/k times the adapter FLOPs, but no loop over experts,
        # no host sync and nothing data-dependent, so it also compiles into one graph.
        dense = weights.new_zeros(T, E).scatter_add(1, indices, weights)
        return soft_routed_lora(x, A, B, dense, scaling, base_out)
    k = indices.shape[1]
    counts = flat.new_zeros(E).scatter_add_(0, flat, torch.ones_like(flat))
    order = torch.argsort(flat, stable=True)
    token = order // k
    # Scaling folded into the [T*k] weights rather than applied to a [T, d_out] tensor.
    w_sorted = (weights.reshape(-1).index_select(0, order).to(x.dtype) * scaling).unsqueeze(-1)
    y_sorted = _grouped_expert_rows(x, A, B, token, w_sorted, counts)
    base = x.new_zeros(T, d_out) if base_out is None else base_out
    return _AddRows.apply(base, token, y_sorted)


class _AddRows(torch.autograd.Function):
    """``base.index_add(0, index, rows)``, whose backward keeps only ``index``: autograd's own ``index_add`` also
    saves ``rows`` (a ``[T*k, d_out]`` tensor) for a shape it could take from ``index``."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return base.index_add(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


def grouped_mm_supported(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs the top-k GEMMs on these operands without a host sync."""
    align_ok = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], A.shape[2], B.shape[2]))
    capability = _cuda_capability(x.device) if x.device.type == "cuda" else None
    return grouped_mm_takes(
        x.device.type,
        capability,
        {x.dtype, A.dtype, B.dtype},
        align_ok and A.is_contiguous() and B.is_contiguous(),
        torch.compiler.is_compiling(),
    )


def grouped_mm_takes(
    device_type: str,
    capability: tuple[int, int] | None,
    dtypes: set[torch.dtype],
    aligned: bool,
    compiling: bool,
) -> bool:
    """The rule behind :func:`grouped_mm_supported`, on plain facts (table-tested for devices this machine lacks).

    - CUDA: bfloat16 operands on sm_90 and newer, where torch runs the grouped GEMM as one kernel on device offsets
      (torch's doc and meta rule: bf16 only; on older GPUs its fallback copies the offsets to the host).
    - CPU: float32, bfloat16 or float16, in eager mode (under ``torch.compile`` the fake-tensor rule is CUDA's, bf16
      only).
    - Both: one dtype for all operands, rows of 16-byte multiples, contiguous experts (torch's stride rule).
    """
    if getattr(torch.nn.functional, "grouped_mm", None) is None or len(dtypes) != 1 or not aligned:
        return False
    (dtype,) = dtypes
    if device_type == "cuda":
        return dtype == torch.bfloat16 and capability is not None and capability >= (9, 0)
    if device_type == "cpu":
        return not compiling and dtype in (torch.float32, torch.bfloat16, torch.float16)
    return False


@functools.cache
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _grouped_expert_rows(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, token: torch.Tensor, w_sorted: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Every expert's rows in two grouped GEMMs (shrink, expand), no Python loop: ``[T*k, d_out]`` in sorted order."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    grouped_mm = torch.nn.functional.grouped_mm
    shared = A.shape[0] == 1
    h = (x @ A[0]).index_select(0, token) if shared else grouped_mm(x.index_select(0, token), A, offs=offs)
    return grouped_mm(h * w_sorted, B, offs=offs)


def per_row_routed_lora(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One expert per row (task routing, serving): ``delta[t] = x[t] A_e B_e`` with ``e = expert_ids[t]``."""
    if expert_ids.shape != (x.shape[0],):
        raise ValueError(f"expert_ids must be [T={x.shape[0]}], got {tuple(expert_ids.shape)}")
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return topk_routed_lora(x, A, B, ones, expert_ids.unsqueeze(1), scaling)
