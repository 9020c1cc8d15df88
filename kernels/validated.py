"""The (GPU vendor and architecture, Triton major.minor, kernel sources) on which the kernels passed a kernel check.

``use_kernels="auto"`` runs the Triton kernels only where :func:`validation_problem` finds none; everywhere else it
runs the PyTorch path and logs once why, and how to opt in (``use_kernels="triton"``). An entry is added only in the
same commit as its record: the JSON that ``python -m benchmarks.kernel_check`` writes under ``benchmarks/results/``
on that GPU, a full run with every kernel test passed (``tests/kernels/test_validated.py`` checks each entry against
its record). Each entry names the content hash of the kernels it checked, so editing a kernel closes the gate until
the check is rerun. Empty until a GPU run is recorded.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
# The gate's own files decide where the kernels run, they compute nothing: editing them keeps a validation.
NOT_KERNEL_SOURCES = frozenset({"validated.py", "availability.py"})


class Validation(NamedTuple):
    """One validated target and the record that validates it."""

    vendor: str  # "cuda", or "hip" where torch.version.hip is set (ROCm reports CUDA-like capabilities)
    arch: str  # "sm_90" on CUDA (capability as sm_<major><minor>), "gfx90a" on ROCm (gcnArchName)
    triton: str  # "3.9": triton.__version__'s major.minor
    sources: str  # kernel_sources_hash() of the kernels the record checked
    record: str  # path of the kernel-check JSON, relative to the repository root


VALIDATED: tuple[Validation, ...] = ()


def sources_hash(folder: Path) -> str:
    """SHA-256 (hex) of the ``*.py`` files in ``folder`` (names and bytes, sorted by name), leaving out
    :data:`NOT_KERNEL_SOURCES`."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        if path.name not in NOT_KERNEL_SOURCES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def kernel_sources_hash() -> str:
    """:func:`sources_hash` of this kernel package, read once per process."""
    return sources_hash(HERE)


def validation_problem(vendor: str, arch: str, triton: str | None, sources: str) -> str | None:
    """Why ``use_kernels="auto"`` may not run the kernels on this target (None when a listed, passing kernel check
    of these very kernel sources opens it)."""
    target = f"{vendor} {arch} with Triton {triton}"
    matches = [v for v in VALIDATED if (v.vendor, v.arch, v.triton) == (vendor, arch, triton)]
    if not matches:
        return f"the Triton kernels are not validated on {target}"
    if all(v.sources != sources for v in matches):
        return (
            f"the Triton kernels changed since their check on {target} ({matches[-1].record} checked sources "
            f"{matches[-1].sources[:12]}, these hash to {sources[:12]}): rerun `python -m benchmarks.kernel_check`"
        )
    return None
