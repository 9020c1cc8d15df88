"""The kernel-run recorder reads pytest's JUnit XML and the recorded comparisons correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ilora.kernels.validated import kernel_sources_hash

from benchmarks import kernel_check, kernel_check_plugin
from benchmarks.kernel_check import summarize

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5"><testcase classname="tests.kernels.test_soft" name="test_a"/>
<testcase classname="tests.kernels.test_soft" name="test_b"><failure message="x"/></testcase>
<testcase classname="tests.kernels.test_topk" name="test_c"/><testcase classname="t" name="s1"><skipped/></testcase>
<testcase classname="t" name="s2"><skipped/></testcase></testsuite></testsuites>"""


def test_summarize_counts_and_keeps_the_worst_comparison(tmp_path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    rows = [
        {"test": "a", "tensor": "dA", "dtype": "bfloat16", "err": 0.1, "bound": 0.4},
        {"test": "b", "tensor": "dA", "dtype": "bfloat16", "err": 0.2, "bound": 0.4},
        {"test": "c", "tensor": "dA", "dtype": "bfloat16", "err": 0.3, "bound": 1.0},
        {"test": "d", "tensor": "out", "dtype": "float32", "err": 1e-6, "bound": 1e-4},
    ]
    (tmp_path / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = summarize(tmp_path / "junit.xml", tmp_path / "errors.jsonl")
    assert out["counts"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2, "passed": 2}
    assert out["failed"] == ["tests.kernels.test_soft::test_b"]
    assert out["comparisons"] == 4
    assert out["worst_errors"]["dA bfloat16"]["test"] == "b"  # the largest share of its bound, not the largest error
    assert out["worst_errors"]["out float32"]["share_of_bound"] == 1e-6 / 1e-4
    assert "sm90_builds" not in out  # no build file given


def test_summarize_keeps_the_sm90_builds(tmp_path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    build = {"kernel": "_mm_kernel", "registers": 96, "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 24576}
    (tmp_path / "builds.jsonl").write_text(json.dumps(build) + "\n")
    out = summarize(tmp_path / "junit.xml", tmp_path / "missing.jsonl", tmp_path / "builds.jsonl")
    assert out["sm90_builds"] == [build] and out["comparisons"] == 0
    assert "sm90_builds" not in summarize(tmp_path / "junit.xml", tmp_path / "e.jsonl", tmp_path / "absent.jsonl")


RUN = """import pytest

def test_ran():
    pass

@pytest.mark.gpu
def test_on_the_gpu():
    pytest.skip("needs a CUDA device")

def test_not_selected():
    pass
"""


def test_a_partial_run_records_its_pytest_args_and_skipped_gpu_tests(tmp_path: Path, monkeypatch, capsys) -> None:
    """What `-- -k ...` and a skipped GPU test leave in the record, so the gate's record check can refuse it."""
    (tmp_path / "test_run.py").write_text(RUN)
    monkeypatch.setattr(kernel_check, "TESTS", [str(tmp_path / "test_run.py")])
    out = tmp_path / "out"
    assert kernel_check.main(["--out", str(out), "--", "-k", "ran or gpu"]) == 0
    (record_path,) = out.glob("*_kernels.json")
    record = json.loads(record_path.read_text())
    assert record["pytest_args"] == ["-k", "ran or gpu"]
    assert [Path(test).name for test in record["gpu_skipped"]] == ["test_run.py::test_on_the_gpu"]
    assert record["counts"]["passed"] == 1 and record["counts"]["skipped"] == 1
    assert record["kernel_sources"] == kernel_sources_hash()


@pytest.mark.parametrize("skipped", [True, False])
def test_the_hook_lists_only_skipped_gpu_tests(skipped: bool, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "skips.txt"
    monkeypatch.setenv(kernel_check_plugin.GPU_SKIPS_ENV, str(target))
    for keywords in ({"gpu": 1}, {}):
        report = type("Report", (), {"skipped": skipped, "keywords": keywords, "nodeid": f"t.py::{len(keywords)}"})
        kernel_check_plugin.pytest_runtest_logreport(report)
    assert (target.read_text().splitlines() if target.exists() else []) == (["t.py::1"] if skipped else [])
