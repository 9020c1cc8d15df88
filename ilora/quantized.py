"""The base layers ilora adapts, by type: how to read each one's weight, fold an update into it and restore it.

ilora's layer calls its base layer in the forward whatever the type, so only merging differs between bases. As PEFT
does for LoRA (``peft/tuners/lora/model.py::_create_new_module`` walks ``dispatch_bnb_8bit``, ``dispatch_bnb_4bit``,
..., ``dispatch_default``; the merges themselves are in ``peft/tuners/lora/bnb.py``), each ``dispatch_*`` function
below looks at one base type and returns its ``WeightBackend``, or None to pass. ``weight_backend`` refuses any other
type by name. A new quantization backend (torchao, HQQ) is one backend class and one dispatcher in ``DISPATCHERS``.

Every backend merges in (at least) float32 and rounds or quantizes once, and restores the weight it replaced exactly.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: float32, or the weight's own dtype when that is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


class WeightBackend(Protocol):
    """Reads and writes the ``[d_out, d_in]`` weight of one kind of base layer."""

    requantizes: bool  # whether `write` quantizes (an error of up to half a quantization step) rather than rounds

    def read(self, base: nn.Module) -> torch.Tensor:
        """The weight, dequantized, in ``compute_dtype`` (a new tensor or a detached view: never written to)."""
        ...

    def write(self, base: nn.Module, value: torch.Tensor, delta: torch.Tensor) -> Any:
        """Store ``value`` (``read(base) + delta``, a tensor the backend may overwrite), rounded or quantized once.
        Returns what ``restore`` needs to put back the weight this replaced, bit for bit."""
        ...

    def restore(self, base: nn.Module, delta: torch.Tensor, saved: Any) -> None:
        """Undo the ``write`` that returned ``saved`` (with the same ``delta``)."""
        ...


class FloatBackend:
    """``nn.Linear`` with a float weight. Unmerging recomputes ``round(merged - delta)``; the elements where that
    misses the original by rounding (a few percent for deltas of about a tenth of the weights) are kept at merge time
    and patched in, so the original comes back bit for bit at a fraction of a copy's memory (a full reference to the
    original is kept instead where that is smaller)."""

    requantizes = False

    def read(self, base: nn.Module) -> torch.Tensor:
        weight = base.weight.detach()
        return weight.to(compute_dtype(weight.dtype))

    def write(self, base: nn.Module, value: torch.Tensor, delta: torch.Tensor) -> Any:
        original = base.weight.data
        merged = value.to(original.dtype, copy=True)
        back = value.copy_(merged).sub_(delta).to(original.dtype)  # `value` is spent: reuse its memory
        bits = _SAME_SIZE_INT[original.element_size()]
        missed = (back.view(bits) != original.view(bits)).reshape(-1).nonzero().squeeze(1)
        base.weight.data = merged  # a new tensor: `original` stays as it was
        if missed.numel() * (missed.element_size() + original.element_size()) >= original.nbytes:
            return original
        return missed, original.reshape(-1)[missed]

    def restore(self, base: nn.Module, delta: torch.Tensor, saved: Any) -> None:
        if isinstance(saved, torch.Tensor):
            base.weight.data = saved
            return
        missed, values = saved
        back = (self.read(base) - delta).to(base.weight.dtype)
        back.view(-1)[missed] = values
        base.weight.data = back


class Bnb4bitBackend:
    """bitsandbytes ``Linear4bit`` (nf4, fp4; nested statistics or not): dequantize, add in float32, quantize once
    with the layer's own block size, type and storage (as ``Params4bit._quantize`` does). Unmerging puts the original
    quantized parameter back, so no second quantization error is added."""

    requantizes = True

    def read(self, base: nn.Module) -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight

        weight = base.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return _read_cpu_packed(weight)
        return dequantize_bnb_weight(weight, state=weight.quant_state).to(torch.float32)

    def write(self, base: nn.Module, value: torch.Tensor, delta: torch.Tensor) -> Any:
        import bitsandbytes as bnb

        original = base.weight
        packed, state = bnb.functional.quantize_4bit(
            value.to(torch.float32).contiguous(), blocksize=original.blocksize,
            compress_statistics=original.compress_statistics, quant_type=original.quant_type,
            quant_storage=original.quant_storage,
        )  # fmt: skip
        # Dequantize to the dtype the layer computed with before (CPU packing records it as `original_dtype`).
        state.dtype = getattr(original.quant_state, "original_dtype", original.quant_state.dtype)
        base.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=original.blocksize,
            compress_statistics=original.compress_statistics, quant_type=original.quant_type,
            quant_storage=original.quant_storage, module=base, bnb_quantized=True,
        )  # fmt: skip
        base.quant_state = state
        return original

    def restore(self, base: nn.Module, delta: torch.Tensor, saved: Any) -> None:
        base.weight = saved
        base.quant_state = saved.quant_state


def _read_cpu_packed(weight: torch.Tensor) -> torch.Tensor:
    """Dequantize a 4-bit weight that bitsandbytes repacked for its CPU kernel (at the layer's first inference
    forward on a CPU with AVX512-BF16): the codes are reordered and the block scales (absmax) kept in bfloat16, as
    ``[blocks per row, d_out]``. Reads the scales the packed forward computes with, without changing the layer."""
    import bitsandbytes.functional as bnbf

    state = copy.deepcopy(weight.quant_state)  # bitsandbytes' inverse rewrites the state it is given
    state.original_nested = False  # keep the bfloat16 scales rather than code them in 8 bits again
    codes, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if state.absmax.dim() == 2:  # bitsandbytes 0.50 leaves un-nested scales in the packed layout
        state.absmax = state.absmax.T.reshape(-1)
    state.absmax = state.absmax.float()
    return bnbf.dequantize_4bit(codes, state).to(torch.float32)


class Bnb8bitBackend:
    """bitsandbytes ``Linear8bitLt`` (int8 weights, ``has_fp16_weights=False``): dequantize, add in float32,
    quantize once row-wise (``int8_vectorwise_quant``, as ``Int8Params._quantize`` does). Unmerging puts the original
    int8 weight and its scales back."""

    requantizes = True

    def read(self, base: nn.Module) -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(base.weight, state=base.state).to(torch.float32)

    def write(self, base: nn.Module, value: torch.Tensor, delta: torch.Tensor) -> Any:
        import bitsandbytes as bnb

        original = base.weight
        scales = original.SCB if original.SCB is not None else base.state.SCB
        codes, new_scales, _ = bnb.functional.int8_vectorwise_quant(value.to(torch.float16).contiguous())
        base.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=new_scales)
        base.state.reset_grads()  # the layer takes codes and scales from the weight at its next forward
        return original, scales

    def restore(self, base: nn.Module, delta: torch.Tensor, saved: Any) -> None:
        original, scales = saved
        original.CB, original.SCB = original.data, scales
        base.weight = original
        base.state.reset_grads()


def _bnb() -> Any:
    # A bitsandbytes layer exists only once bitsandbytes is imported: never import it just to look.
    return sys.modules.get("bitsandbytes")


def dispatch_bnb_4bit(base: nn.Module) -> WeightBackend | None:
    bnb = _bnb()
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit) and getattr(base.weight, "bnb_quantized", False):
        return Bnb4bitBackend()
    return None


def dispatch_bnb_8bit(base: nn.Module) -> WeightBackend | None:
    bnb = _bnb()
    if bnb is not None and isinstance(base, bnb.nn.Linear8bitLt) and base.weight.dtype == torch.int8:
        return Bnb8bitBackend()
    return None


def dispatch_float_linear(base: nn.Module) -> WeightBackend | None:
    weight = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) and type(weight) is nn.Parameter and weight.dtype.is_floating_point:
        return FloatBackend()
    return None


# The first match wins: quantized layers subclass nn.Linear, so the plain one comes last.
DISPATCHERS: tuple[Callable[[nn.Module], WeightBackend | None], ...] = (
    dispatch_bnb_4bit,
    dispatch_bnb_8bit,
    dispatch_float_linear,
)

SUPPORTED = (
    "torch.nn.Linear with a floating-point weight, bitsandbytes Linear4bit (nf4 or fp4, quantized) and "
    "Linear8bitLt (int8 weights, has_fp16_weights=False)"
)


def weight_backend(base: nn.Module) -> WeightBackend:
    """The backend of ``base``, or a ``TypeError`` that names its type and what ilora supports."""
    for dispatch in DISPATCHERS:
        backend = dispatch(base)
        if backend is not None:
            return backend
    kind = type(base)
    weight = getattr(base, "weight", None)
    described = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(weight, torch.Tensor):
        described += f" with a {type(weight).__name__} weight of dtype {weight.dtype}"
    raise TypeError(
        f"ilora cannot adapt a {described}: supported base layers are {SUPPORTED}. Leave the module out "
        "(narrow target_modules or add it to exclude_modules), or load the model unquantized or with bitsandbytes"
    )


__all__ = [
    "DISPATCHERS",
    "Bnb4bitBackend",
    "Bnb8bitBackend",
    "FloatBackend",
    "WeightBackend",
    "compute_dtype",
    "dispatch_bnb_4bit",
    "dispatch_bnb_8bit",
    "dispatch_float_linear",
    "weight_backend",
]
