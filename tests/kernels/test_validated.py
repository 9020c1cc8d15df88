"""The ``use_kernels="auto"`` gate: every validated pair has a committed, passing kernel-check record of that pair,
and no other pair opens the gate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ilora.kernels import availability, validated
from ilora.kernels.validated import VALIDATED, Validation

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.no_triton_ok


def record_problems(entry: Validation, root: Path) -> list[str]:
    """Why ``entry``'s record does not validate it (empty when it does): the file is committed, ran the compiled
    kernels on ``entry.arch`` with Triton ``entry.triton``, and every test passed."""
    path = root / entry.record
    if not path.is_file():
        return [f"{entry.record}: no such file"]
    if (root / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", entry.record], cwd=root, capture_output=True)
        if tracked.returncode != 0:
            return [f"{entry.record}: not committed"]
    rec = json.loads(path.read_text())
    counts = rec.get("counts", {})
    triton = ".".join(str(rec.get("versions", {}).get("triton")).split(".")[:2])
    checks = {
        "not a compiled GPU run": str(rec.get("device", "")).startswith("cuda"),
        f"recorded on {rec.get('gpu_arch')}, not {entry.arch}": rec.get("gpu_arch") == entry.arch,
        f"recorded with Triton {triton}, not {entry.triton}": triton == entry.triton,
        f"pytest exited {rec.get('pytest_exit')}": rec.get("pytest_exit") == 0,
        f"failed tests: {rec.get('failed')}": not rec.get("failed") and not counts.get("failures"),
        "errors in the run": not counts.get("errors"),
        "no test passed": counts.get("passed", 0) > 0,
    }
    return [f"{entry.record}: {why}" for why, ok in checks.items() if not ok]


def test_every_validated_pair_has_a_committed_passing_record() -> None:
    pairs = [(v.arch, v.triton) for v in VALIDATED]
    assert len(pairs) == len(set(pairs)), f"a pair is listed twice: {pairs}"
    for entry in VALIDATED:
        assert record_problems(entry, ROOT) == []


PASSING = {
    "device": "cuda (compiled)",
    "gpu_arch": "sm_90",
    "versions": {"triton": "3.9.0"},
    "pytest_exit": 0,
    "counts": {"tests": 123, "failures": 0, "errors": 0, "skipped": 0, "passed": 123},
    "failed": [],
}
BAD = {
    "cpu_run": ({"device": "cpu (TRITON_INTERPRET)", "gpu_arch": None}, "not a compiled GPU run"),
    "other_arch": ({"gpu_arch": "sm_80"}, "recorded on sm_80, not sm_90"),
    "other_triton": ({"versions": {"triton": "3.10.1"}}, "recorded with Triton 3.10, not 3.9"),
    "failed_test": ({"pytest_exit": 1, "failed": ["tests/kernels/test_soft.py::test_x"]}, "failed tests"),
    "errors": ({"counts": {**PASSING["counts"], "errors": 2}}, "errors in the run"),
    "nothing_ran": ({"counts": {**PASSING["counts"], "passed": 0}}, "no test passed"),
}


@pytest.mark.parametrize("case", ["passing", *BAD])
def test_record_check_refuses_what_does_not_validate(case: str, tmp_path: Path) -> None:
    change, why = BAD.get(case, ({}, None))
    (tmp_path / "rec.json").write_text(json.dumps({**PASSING, **change}))
    problems = record_problems(Validation("sm_90", "3.9", "rec.json"), tmp_path)
    if why is None:
        assert problems == []
    else:
        assert any(why in p for p in problems), problems
    assert record_problems(Validation("sm_90", "3.9", "missing.json"), tmp_path) == ["missing.json: no such file"]


def test_auto_opens_only_on_listed_pairs(monkeypatch) -> None:
    monkeypatch.setattr(validated, "VALIDATED", (Validation("sm_90", "3.9", "benchmarks/results/x.json"),))
    assert validated.is_validated("sm_90", "3.9")
    for arch, triton in [("sm_80", "3.9"), ("sm_100", "3.9"), ("sm_90", "3.8"), ("sm_90", "3.10"), ("sm_9", "3.9")]:
        assert not validated.is_validated(arch, triton), (arch, triton)
    monkeypatch.setattr(availability, "gpu_arch", lambda device: "sm_90")
    for version, expected in [("3.9", True), ("3.10", False), (None, False)]:
        monkeypatch.setattr(availability, "triton_minor_version", lambda v=version: v)
        assert availability.gpu_target(torch.device("cuda")) == ("sm_90", version, expected)
