"""FLOP counts and the FLOP floor: the time a provider would take if the adapter ran at the base GEMM's speed.

Forward FLOPs, counting a multiply-add as 2 and ignoring elementwise work:

- base linear: ``F_base = 2 T d_in d_out``
- adapter (the minimal routed-LoRA algorithm, whatever a provider actually does):
  ``F_adapter = 2 T d_in E`` (router) ``+ 2 T d_in r n_A`` (shrink) ``+ 2 T k r d_out`` (expand),
  with ``k`` the experts per token (``E`` for soft routing) and ``n_A = 1`` for a shared A, ``k`` otherwise.

Backward, with the base weight frozen and ``x`` requiring grad: the base computes only ``dx`` (1x its forward); the
adapter computes the gradient of both operands of each of its matmuls (2x its forward). Per mode:

    mode      base factor   adapter factor
    fwd            1              1
    bwd            1              2
    fwd+bwd        2              3

    floor = t_base * (1 + (adapter factor * F_adapter) / (base factor * F_base))

where ``t_base`` is the base linear's median time in the same run and mode. A provider at ``1.00x`` of the floor
adds exactly the time its extra FLOPs would cost at base-GEMM efficiency; more means overhead (extra memory
passes, small GEMMs, launches), less means it beat base-GEMM efficiency (possible for tiny shapes).
"""

from __future__ import annotations

from .providers import Shape

MODES = ("fwd", "bwd", "fwd+bwd")
_FACTORS: dict[str, tuple[int, int]] = {"fwd": (1, 1), "bwd": (1, 2), "fwd+bwd": (2, 3)}


def base_flops(tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of the base linear."""
    return 2 * tokens * d_in * d_out


def adapter_flops(shape: Shape, tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of the routed adapter, router included."""
    k, r = shape.active, shape.rank
    shrink_heads = 1 if shape.shared_a else k
    return 2 * tokens * (d_in * shape.experts + d_in * r * shrink_heads + k * r * d_out)


def flop_ratio(shape: Shape, tokens: int, d_in: int, d_out: int, mode: str) -> float:
    """Adapter FLOPs over base FLOPs in ``mode``."""
    base_factor, adapter_factor = _FACTORS[mode]
    return adapter_factor * adapter_flops(shape, tokens, d_in, d_out) / (base_factor * base_flops(tokens, d_in, d_out))


def flop_floor(base_time: float, shape: Shape, tokens: int, d_in: int, d_out: int, mode: str) -> float:
    """``base_time * (1 + adapter FLOPs / base FLOPs)`` for ``mode`` (see the module docstring)."""
    return base_time * (1.0 + flop_ratio(shape, tokens, d_in, d_out, mode))
