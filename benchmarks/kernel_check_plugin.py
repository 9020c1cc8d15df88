"""The pytest plugin ``python -m benchmarks.kernel_check`` loads into its test run (``-p``): it lists the skipped
``gpu``-marked tests, so that a record of a run that skipped any cannot validate a GPU. Imports nothing heavy."""

from __future__ import annotations

import os

import pytest

GPU_SKIPS_ENV = "ILORA_KERNEL_GPU_SKIPS"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Append each skipped ``gpu``-marked test's node id to the file ``$ILORA_KERNEL_GPU_SKIPS`` names."""
    target = os.environ.get(GPU_SKIPS_ENV)
    if target and report.skipped and "gpu" in report.keywords:
        with open(target, "a") as f:
            f.write(report.nodeid + "\n")
