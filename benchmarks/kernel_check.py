"""Record a kernel test run: pass/fail of every kernel test, the largest error of each comparison and the resources
of every sm_90 build (registers, spills, shared memory, MMA kind), with the machine, versions and commit, as
``out/<date>T<time>_<machine>_kernels.json`` (ignored), or with ``--record`` as the committed
``results/<date>_<machine>_kernels.json`` (refused if it exists).

    python -m benchmarks.kernel_check                 # on a GPU: compiled kernels, bf16, the convergence test
    python -m benchmarks.kernel_check -- -k "soft"    # extra pytest arguments after --: a partial run

On CPU the same tests run through the Triton interpreter (GPU-only tests are skipped and counted as such). The record
keeps the pytest arguments, the GPU tests that were skipped and the hash of the kernel sources it checked: only a full
run on the GPU (no arguments, no GPU test skipped, none failed) can validate it (:func:`record_problems`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ilora.kernels import availability
from ilora.kernels.validated import Validation, kernel_sources_hash

from .kernel_check_plugin import GPU_SKIPS_ENV
from .report import check_free, environment, result_paths, run_main, write_text_new
from .run import add_output_args

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/kernels", "tests/ilora/test_layer_kernels.py"]
PLUGIN = "benchmarks.kernel_check_plugin"


def summarize(junit_xml: Path, errors_jsonl: Path, builds_jsonl: Path | None = None) -> dict[str, Any]:
    """Counts and failures from pytest's JUnit XML; per (tensor, dtype) the largest error and its share of the
    bound from the comparisons the kernel tests recorded; the sm_90 builds as recorded."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for suite in ET.parse(junit_xml).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    worst: dict[str, dict[str, Any]] = {}
    lines = errors_jsonl.read_text().splitlines() if errors_jsonl.is_file() else []
    for row in map(json.loads, lines):
        key = f"{row['tensor']} {row['dtype']}"
        ratio = row["err"] / row["bound"] if row["bound"] else float("inf")
        if key not in worst or ratio > worst[key]["share_of_bound"]:
            worst[key] = {"max_err": row["err"], "bound": row["bound"], "share_of_bound": ratio, "test": row["test"]}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record = {"counts": counts, "failed": failed, "comparisons": len(lines), "worst_errors": worst}
    if builds_jsonl is not None and builds_jsonl.is_file():
        record["sm90_builds"] = [json.loads(line) for line in builds_jsonl.read_text().splitlines()]
    return record


def record_problems(entry: Validation, root: Path) -> list[str]:
    """Why ``entry``'s record does not validate it (empty when it does): the file is committed, is a full run (no
    pytest arguments, no GPU test skipped) of the compiled kernels on ``entry``'s vendor and arch with Triton
    ``entry.triton`` and kernel sources ``entry.sources``, and every test passed."""
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
    target = (rec.get("gpu_vendor"), rec.get("gpu_arch"))
    checks = {
        "not a compiled GPU run": str(rec.get("device", "")).startswith("cuda"),
        f"recorded on {target}, not {(entry.vendor, entry.arch)}": target == (entry.vendor, entry.arch),
        f"recorded with Triton {triton}, not {entry.triton}": triton == entry.triton,
        f"recorded for kernel sources {rec.get('kernel_sources')}, not {entry.sources}": (
            rec.get("kernel_sources") == entry.sources
        ),
        f"a partial run (pytest args {rec.get('pytest_args')})": rec.get("pytest_args") == [],
        f"GPU tests skipped: {rec.get('gpu_skipped')}": rec.get("gpu_skipped") == [],
        f"pytest exited {rec.get('pytest_exit')}": rec.get("pytest_exit") == 0,
        f"failed tests: {rec.get('failed')}": not rec.get("failed") and not counts.get("failures"),
        "errors in the run": not counts.get("errors"),
        "no test passed": counts.get("passed", 0) > 0,
    }
    return [f"{entry.record}: {why}" for why, ok in checks.items() if not ok]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_check", description=__doc__.split("\n")[0])
    add_output_args(ap)
    ap.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = ap.parse_args(argv)
    path, _ = result_paths(environment(torch.get_num_threads()), "kernels", args.record, args.out, args.tag)
    if not args.no_write:
        check_free([path])
    with tempfile.TemporaryDirectory() as tmp:
        names = ("junit.xml", "errors.jsonl", "builds.jsonl", "gpu_skips.txt")
        junit, errors, builds, gpu_skips = (Path(tmp) / name for name in names)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN, *TESTS]
        proc = subprocess.run(
            [*cmd, f"--junitxml={junit}", *args.pytest_args],
            cwd=ROOT,
            env={
                **os.environ,
                "ILORA_KERNEL_ERRORS": str(errors),
                "ILORA_KERNEL_BUILDS": str(builds),
                GPU_SKIPS_ENV: str(gpu_skips),
            },
        )
        record = {
            **environment(torch.get_num_threads()),
            "pytest_exit": proc.returncode,
            "pytest_args": list(args.pytest_args),
            "gpu_skipped": gpu_skips.read_text().splitlines() if gpu_skips.is_file() else [],
            **summarize(junit, errors, builds),
        }
    record["device"] = "cuda (compiled)" if torch.cuda.is_available() else "cpu (TRITON_INTERPRET)"
    # What the use_kernels="auto" gate (ilora/kernels/validated.py) is keyed on.
    vendor, arch = availability.gpu_arch(torch.device("cuda")) if torch.cuda.is_available() else (None, None)
    record.update(gpu_vendor=vendor, gpu_arch=arch, kernel_sources=kernel_sources_hash())
    print(json.dumps({k: record[k] for k in ("device", "counts", "failed", "comparisons")}, indent=1))
    for key, worst in sorted(record["worst_errors"].items()):
        print(f"  {key:>16}: max err {worst['max_err']:.3g} = {worst['share_of_bound']:.0%} of the bound")
    if record.get("sm90_builds"):
        rows = record["sm90_builds"]
        print(
            f"  sm_90 builds: {len(rows)}, most registers {max(r['registers'] for r in rows)}, "
            f"spilled {sum(1 for r in rows if r['spill_bytes'] or r['stack_bytes'])}, "
            f"most shared memory {max(r['shared_bytes'] for r in rows)} B"
        )
    if not args.no_write:
        write_text_new(path, json.dumps(record, indent=1))
        print(f"wrote {path}")
        if record["gpu_arch"]:
            triton = ".".join(str(record["versions"]["triton"]).split(".")[:2])
            rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
            entry = Validation(vendor, arch, triton, record["kernel_sources"], str(rel))
            problems = [p for p in record_problems(entry, ROOT) if not p.endswith("not committed")]
            if problems:
                print("this record cannot validate the GPU:\n  " + "\n  ".join(problems))
            else:
                print(f"to open use_kernels='auto' on this GPU: add {entry!r} to kernels/validated.py; commit both")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(run_main(main))
