"""Where the Triton kernels can run, and where they are validated.

Runnable: triton importable, and the tensor on CUDA or on CPU under the interpreter. Validated: the device's GPU
architecture and the installed Triton's major.minor are listed in ``validated.py``, backed by a passing
kernel-check record. The layer's path choice (``ilora.paths``) asks :func:`triton_runnable` and :func:`gpu_target`;
the kernels call :func:`ensure_runnable` so a wrong call fails with a clear message instead of a Triton device error.
"""

from __future__ import annotations

import functools

import torch

from ._utils import HAS_TRITON, interpreting, triton
from .validated import is_validated


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


def triton_minor_version() -> str | None:
    """The installed Triton as ``"major.minor"`` (``"3.9"``), or None without triton."""
    if not HAS_TRITON:
        return None
    return ".".join(triton.__version__.split(".")[:2])


@functools.cache
def gpu_arch(device: torch.device) -> str:
    """The CUDA device's architecture as ``sm_<major><minor>`` (``sm_90`` for an H100/H200)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def gpu_target(device: torch.device) -> tuple[str, str | None, bool]:
    """``(arch, triton major.minor, validated)`` of a CUDA device: whether ``use_kernels="auto"`` may pick Triton."""
    arch, version = gpu_arch(device), triton_minor_version()
    return arch, version, version is not None and is_validated(arch, version)
