"""The kernel-run recorder reads pytest's JUnit XML and the recorded comparisons correctly."""

from __future__ import annotations

import json

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
