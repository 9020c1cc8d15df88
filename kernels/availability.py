"""Where the Triton kernels can run, and where they are validated.

Runnable: triton importable, and the tensor on CUDA or on CPU under the interpreter. Validated: the device's GPU
vendor and architecture, the installed Triton's major.minor and the kernels' source hash are listed in
``validated.py``, backed by a passing kernel-check record. The layer's path choice (``ilora.paths``) asks
:func:`triton_runnable` and :func:`gpu_target`; the kernels call :func:`ensure_runnable` so a wrong call fails with a
clear message instead of a Triton device error.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._utils import HAS_TRITON, interpreting, triton
from .validated import kernel_sources_hash, validation_problem


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
def gpu_arch(device: torch.device) -> tuple[str, str]:
    """``(vendor, arch)`` of a CUDA-API device: ``("cuda", "sm_90")`` for an H100/H200, ``("hip", "gfx90a")`` for an
    MI200 under ROCm, whose capability (9, 0) must never pass for sm_90."""
    if torch.version.hip:
        return "hip", str(torch.cuda.get_device_properties(device).gcnArchName).split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return "cuda", f"sm_{major}{minor}"


class GpuTarget(NamedTuple):
    vendor: str
    arch: str
    triton: str | None  # major.minor, None without triton
    problem: str | None  # why use_kernels="auto" may not run the kernels here (None: validated)

    @property
    def name(self) -> str:
        return f"{self.vendor} {self.arch} with Triton {self.triton}"


def gpu_target(device: torch.device) -> GpuTarget:
    """The device's target and whether ``use_kernels="auto"`` may pick Triton on it (``problem`` is None)."""
    (vendor, arch), version = gpu_arch(device), triton_minor_version()
    problem = "triton is not installed" if version is None else None
    problem = problem or validation_problem(vendor, arch, version, kernel_sources_hash())
    return GpuTarget(vendor, arch, version, problem)
