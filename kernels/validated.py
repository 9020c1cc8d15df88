"""The (GPU architecture, Triton major.minor) pairs on which the kernels have passed a recorded kernel check.

``use_kernels="auto"`` runs the Triton kernels only on these pairs; everywhere else it runs the PyTorch path and logs
once how to opt in (``use_kernels="triton"``). An entry is added only in the same commit as its record: the JSON that
``python -m benchmarks.kernel_check`` writes under ``benchmarks/results/`` on that GPU, with every kernel test passed
(``tests/kernels/test_validated.py`` checks each entry against its record). Empty until a GPU run is recorded.
"""

from __future__ import annotations

from typing import NamedTuple


class Validation(NamedTuple):
    """One validated pair and the record that validates it."""

    arch: str  # "sm_90": torch.cuda.get_device_capability as sm_<major><minor>
    triton: str  # "3.9": triton.__version__'s major.minor
    record: str  # path of the kernel-check JSON, relative to the repository root


VALIDATED: tuple[Validation, ...] = ()


def is_validated(arch: str, triton_version: str) -> bool:
    """Whether a recorded kernel-check run passed on ``arch`` (``"sm_90"``) with Triton ``triton_version``
    (``"3.9"``)."""
    return any(v.arch == arch and v.triton == triton_version for v in VALIDATED)
