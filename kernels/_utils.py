"""Shared pieces of the routed-LoRA kernels: the optional Triton import, lazy kernel compilation, buffers, ``tl.dot``
arguments and tile sizes, and the autograd and reference wiring every op file uses. The strided GEMM is in ``gemm.py``.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    # tl.zeros and tl.sum are @triton.jit helpers, bound to compiled or interpreted execution when triton is imported.
    # Kernels use the builtins under them (tl.full; tl.reduce with triton's own sum combiner, which the interpreter
    # maps to numpy), so they still run when TRITON_INTERPRET is set after something else imported triton.
    from triton.language.standard import _sum_combine as sum_combine
except ImportError:  # triton is an optional extra: the package must import without it
    triton = None
    tl = None
    sum_combine = None

HAS_TRITON = triton is not None

_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (read at launch time, not at import time)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")  # triton's own parsing


class kernel:
    """``triton.jit`` deferred to the first launch, with an optional autotuned variant for the compiled path.

    ``triton.jit`` decides between compiled and interpreted execution when it decorates, so decorating at import would
    freeze whatever ``TRITON_INTERPRET`` held when some earlier code imported this package. Compiling per mode on
    launch honours the variable whenever it is set (see ``sum_combine`` above for triton's own helpers), and lets the
    package import without triton.

    ``kernel[grid]`` launches with the block sizes the launcher passes. With ``configs`` (``(BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages)`` tuples), ``kernel.tuned[grid]`` is the compiled kernel ``triton.autotune``d over
    them by ``key`` after ``prune(configs, named_args, **constexprs)``, the launcher leaving the block sizes out. The
    interpreter has no tuned variant: it cannot benchmark, and its cost is per program, not per element.
    """

    def __init__(self, fn, configs=(), key=(), prune=None, do_not_specialize=()):
        self.fn = fn
        self.configs, self.key, self.prune = tuple(configs), list(key), prune
        self.do_not_specialize = list(do_not_specialize)
        self._by_mode = {}
        self._tuned = None

    @classmethod
    def with_configs(cls, configs, key, prune, do_not_specialize=()):
        """Decorator form: ``@kernel.with_configs(configs, key, prune)``."""
        return lambda fn: cls(fn, configs, key, prune, do_not_specialize)

    def _jit(self):
        if not HAS_TRITON:
            raise RuntimeError("ilora.kernels needs triton: pip install 'ilora[triton]'")
        return triton.jit(self.fn, do_not_specialize=self.do_not_specialize)

    def triton_configs(self) -> list:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in self.configs
        ]

    def __getitem__(self, grid):
        mode = interpreting()
        if mode not in self._by_mode:
            self._by_mode[mode] = self._jit()
        return self._by_mode[mode][grid]

    @property
    def tuned(self):
        """The autotuned compiled kernel (index it with a grid callable of the chosen config's block sizes)."""
        if not self.configs or interpreting():
            raise RuntimeError(f"{self.fn.__name__} has no autotuned variant here (no configs, or interpreting)")
        if self._tuned is None:
            prune = {"early_config_prune": self.prune} if self.prune else None
            self._tuned = triton.autotune(self.triton_configs(), key=self.key, prune_configs_by=prune)(self._jit())
        return self._tuned


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that a kernel fully overwrites (tests replace this to poison buffers with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_args(dtype: torch.dtype) -> dict:
    """``DOT`` (operand dtype) and ``PRECISION`` constexprs for ``tl.dot`` on inputs of ``dtype``.

    fp32 operands in the interpreter (its bf16 arithmetic is wrong) and for fp32 inputs, there with IEEE precision so
    fp32 matches PyTorch (TF32 would not); else the 16-bit input dtype, so tensor cores run with fp32 accumulation.
    """
    if interpreting() or dtype not in (torch.float16, torch.bfloat16):
        return {"DOT": tl.float32, "PRECISION": "ieee"}
    return {"DOT": _TL_DTYPES[dtype], "PRECISION": "tf32"}  # tf32 is the default and only affects fp32 operands


def block(n: int, cap: int) -> int:
    """Power-of-two tile edge covering ``n`` up to ``cap`` (at least 16, the smallest ``tl.dot`` tile)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def tile_cap() -> int:
    """The interpreter pays per program and per op, not per element: larger tiles there keep tests fast."""
    return 128 if interpreting() else 64


def register_routed_autograd(op, backward_op) -> None:
    """Autograd for a routed-LoRA op ``(x, A, B, *routing, scaling, base) -> (out, h)``.

    Saves the inputs and ``h``; ``backward_op(dy, x, A, B, *routing, h, scaling)`` returns ``(dx, dA, dB)`` plus the
    gradient of the first routing tensor when it has one (gates, top-k weights; never indices). ``dy`` flows to
    ``base`` unchanged: the residual add is fused into the op.
    """

    def setup_context(ctx, inputs, output):
        x, A, B, *routing, scaling, base = inputs
        ctx.save_for_backward(x, A, B, *routing, output[1])
        ctx.scaling = scaling
        ctx.base_dtype = base.dtype if base is not None else None

    def backward(ctx, dy, _dh):
        x, A, B, *routing, h = ctx.saved_tensors
        grads = tuple(backward_op(dy, x, A, B, *routing, h, ctx.scaling))
        routing_grads = grads[3:] + (None,) * (len(routing) - len(grads[3:]))
        dbase = dy.to(ctx.base_dtype) if ctx.base_dtype is not None else None
        return (*grads[:3], *routing_grads, None, dbase)

    op.register_autograd(backward, setup_context=setup_context)


def reference(math, tensors: tuple[torch.Tensor, ...], base_out: torch.Tensor | None, upcast: bool) -> torch.Tensor:
    """A kernel's PyTorch reference: ``math(*tensors) (+ base_out)``, in fp32 when ``upcast`` (pass the floating
    tensors only), cast back to the first tensor's dtype."""
    dtype = tensors[0].dtype
    if upcast:
        tensors = tuple(t.float() for t in tensors)
        base_out = base_out.float() if base_out is not None else None
    out = math(*tensors)
    if base_out is not None:
        out = out + base_out
    return out.to(dtype)
