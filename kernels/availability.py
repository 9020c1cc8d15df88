"""When the Triton kernels can run: triton importable, and the tensor on CUDA or on CPU under the interpreter.

Callers (the PEFT layer) ask :func:`triton_runnable` and fall back to ``ilora.functional`` otherwise; the kernels call
:func:`ensure_runnable` so a wrong call fails with a clear message instead of a Triton device error.
"""

from __future__ import annotations

import torch

from ._utils import HAS_TRITON, interpreting


def triton_runnable(x: torch.Tensor) -> bool:
    """True when triton imports and ``x`` is on CUDA, or on CPU with ``TRITON_INTERPRET=1`` set."""
    if not HAS_TRITON:
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


def ensure_runnable(x: torch.Tensor) -> None:
    """Raise ``RuntimeError`` unless :func:`triton_runnable` holds for ``x``."""
    if not HAS_TRITON:
        raise RuntimeError("ilora.kernels needs triton (pip install 'ilora[triton]'); use ilora.functional instead")
    if not triton_runnable(x):
        raise RuntimeError(
            f"ilora.kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1; got a tensor on {x.device}"
        )
