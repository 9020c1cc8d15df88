"""The ``use_kernels="auto"`` gate: every validated pair has a committed, passing kernel-check record of that pair,
and no other pair opens the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ilora.kernels import availability, validated
from ilora.kernels.validated import VALIDATED, Validation, kernel_sources_hash

import ilora
from benchmarks.kernel_check import record_problems
from ilora import paths

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.no_triton_ok


def test_every_validated_pair_has_a_committed_passing_record() -> None:
    pairs = [(v.vendor, v.arch, v.triton, v.sources) for v in VALIDATED]
    assert len(pairs) == len(set(pairs)), f"a pair is listed twice: {pairs}"
    for entry in VALIDATED:
        assert record_problems(entry, ROOT) == []


PASSING = {
    "device": "cuda (compiled)",
    "gpu_vendor": "cuda",
    "gpu_arch": "sm_90",
    "kernel_sources": "ab" * 32,
    "versions": {"triton": "3.9.0"},
    "pytest_exit": 0,
    "counts": {"tests": 123, "failures": 0, "errors": 0, "skipped": 0, "passed": 123},
    "failed": [],
    "pytest_args": [],
    "gpu_skipped": [],
}
BAD = {
    "cpu_run": ({"device": "cpu (TRITON_INTERPRET)", "gpu_arch": None}, "not a compiled GPU run"),
    "other_arch": ({"gpu_arch": "sm_80"}, "recorded on ('cuda', 'sm_80'), not ('cuda', 'sm_90')"),
    "other_vendor": ({"gpu_vendor": "hip"}, "recorded on ('hip', 'sm_90'), not ('cuda', 'sm_90')"),
    "other_sources": ({"kernel_sources": "cd" * 32}, f"recorded for kernel sources {'cd' * 32}, not {'ab' * 32}"),
    "other_triton": ({"versions": {"triton": "3.10.1"}}, "recorded with Triton 3.10, not 3.9"),
    "failed_test": ({"pytest_exit": 1, "failed": ["tests/kernels/test_soft.py::test_x"]}, "failed tests"),
    "errors": ({"counts": {**PASSING["counts"], "errors": 2}}, "errors in the run"),
    "nothing_ran": ({"counts": {**PASSING["counts"], "passed": 0}}, "no test passed"),
    # `python -m benchmarks.kernel_check -- -k soft`: 1 test ran, the rest deselected or skipped.
    "selection_args": ({"pytest_args": ["-k", "soft"]}, "a partial run (pytest args ['-k', 'soft'])"),
    "gpu_test_skipped": ({"gpu_skipped": ["tests/kernels/test_soft.py::test_gpu_x"]}, "GPU tests skipped"),
    "args_not_recorded": ({"pytest_args": None}, "a partial run (pytest args None)"),
    "skips_not_recorded": ({"gpu_skipped": None}, "GPU tests skipped: None"),
}


@pytest.mark.parametrize("case", ["passing", *BAD])
def test_record_check_refuses_what_does_not_validate(case: str, tmp_path: Path) -> None:
    change, why = BAD.get(case, ({}, None))
    (tmp_path / "rec.json").write_text(json.dumps({**PASSING, **change}))
    problems = record_problems(Validation("cuda", "sm_90", "3.9", "ab" * 32, "rec.json"), tmp_path)
    if why is None:
        assert problems == []
    else:
        assert any(why in p for p in problems), problems
    assert record_problems(Validation("cuda", "sm_90", "3.9", "ab" * 32, "missing.json"), tmp_path) == [
        "missing.json: no such file"
    ]


def _gate(monkeypatch, *entries: Validation) -> None:
    monkeypatch.setattr(validated, "VALIDATED", entries)
    monkeypatch.setattr(availability, "triton_minor_version", lambda: "3.9")


def test_auto_opens_only_on_listed_targets_of_these_sources(monkeypatch) -> None:
    here = kernel_sources_hash()
    _gate(monkeypatch, Validation("cuda", "sm_90", "3.9", here, "benchmarks/results/x.json"))
    assert validated.validation_problem("cuda", "sm_90", "3.9", here) is None
    others = [("cuda", "sm_80", "3.9"), ("cuda", "sm_100", "3.9"), ("cuda", "sm_90", "3.8"), ("hip", "sm_90", "3.9")]
    for vendor, arch, triton in [*others, ("cuda", "sm_90", "3.10"), ("cuda", "sm_90", None)]:
        problem = validated.validation_problem(vendor, arch, triton, here)
        assert problem == f"the Triton kernels are not validated on {vendor} {arch} with Triton {triton}"
    monkeypatch.setattr(availability, "gpu_arch", lambda device: ("cuda", "sm_90"))
    assert availability.gpu_target(torch.device("cuda")) == ("cuda", "sm_90", "3.9", None)
    monkeypatch.setattr(availability, "triton_minor_version", lambda: None)
    assert availability.gpu_target(torch.device("cuda")).problem == "triton is not installed"


def test_rocm_reporting_capability_9_0_is_not_sm_90(monkeypatch) -> None:
    """An MI200 under ROCm reports capability (9, 0): it is ("hip", "gfx90a"), never the validated sm_90."""
    _gate(monkeypatch, Validation("cuda", "sm_90", "3.9", kernel_sources_hash(), "benchmarks/results/x.json"))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    props = type("Props", (), {"gcnArchName": "gfx90a:sramecc+:xnack-"})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    try:
        target = availability.gpu_target(torch.device("cuda"))
    finally:
        availability.gpu_arch.cache_clear()
    assert (target.vendor, target.arch) == ("hip", "gfx90a")
    assert target.problem == "the Triton kernels are not validated on hip gfx90a with Triton 3.9"


def test_edited_kernels_close_the_gate_with_the_reason(monkeypatch, tmp_path) -> None:
    """A validation binds the kernel sources: once a kernel file changes, ``auto`` runs PyTorch and says why."""
    for path in validated.HERE.glob("*.py"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert validated.sources_hash(tmp_path) == kernel_sources_hash()
    (tmp_path / "validated.py").write_text("# the gate's own files are not kernel sources\n")
    assert validated.sources_hash(tmp_path) == kernel_sources_hash()
    (tmp_path / "soft.py").write_bytes((tmp_path / "soft.py").read_bytes() + b"\n# edited\n")
    edited = validated.sources_hash(tmp_path)
    assert edited != kernel_sources_hash()
    _gate(monkeypatch, Validation("cuda", "sm_90", "3.9", edited, "benchmarks/results/x.json"))
    monkeypatch.setattr(availability, "gpu_arch", lambda device: ("cuda", "sm_90"))
    target = availability.gpu_target(torch.device("cuda"))
    assert target.problem is not None and f"checked sources {edited[:12]}" in target.problem
    assert f"these hash to {kernel_sources_hash()[:12]}" in target.problem
    # What the layer's path choice makes of it: PyTorch, and the reason in the note it logs once.
    facts = paths.DeviceFacts("cuda", True, target.problem is None, target.name, target.problem or "")
    config = ilora.ILoraConfig(target_modules=["q"], r=4, num_experts=3, routing="soft")
    choice = paths.select_path(config, "dense", 8, facts)
    assert choice.path is paths.ComputePath.TORCH_SOFT and choice.note is not None
    assert choice.note.startswith(f"ilora: {target.problem}, so use_kernels='auto' runs the PyTorch path")
