"""Record a kernel test run: pass/fail of every kernel test, the largest error of each comparison and the resources
of every sm_90 build (registers, spills, shared memory, MMA kind), with the machine, versions and commit, as
``out/<date>T<time>_<machine>_kernels.json`` (ignored), or with ``--record`` as the committed
``results/<date>_<machine>_kernels.json`` (refused if it exists).

    python -m benchmarks.kernel_check                 # on a GPU: compiled kernels, bf16, the convergence test
    python -m benchmarks.kernel_check -- -k "soft"    # extra pytest arguments after --

On CPU the same tests run through the Triton interpreter (GPU-only tests are skipped and counted as such).
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

from .report import check_free, environment, result_paths, write_text_new
from .run import add_output_args

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/kernels", "tests/ilora/test_layer_kernels.py"]


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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_check", description=__doc__.split("\n")[0])
    add_output_args(ap)
    ap.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = ap.parse_args(argv)
    path, _ = result_paths(environment(torch.get_num_threads()), "kernels", args.record, args.out)
    if not args.no_write:
        check_free([path])
    with tempfile.TemporaryDirectory() as tmp:
        junit, errors, builds = (Path(tmp) / name for name in ("junit.xml", "errors.jsonl", "builds.jsonl"))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, f"--junitxml={junit}"]
        proc = subprocess.run(
            [*cmd, *args.pytest_args],
            cwd=ROOT,
            env={**os.environ, "ILORA_KERNEL_ERRORS": str(errors), "ILORA_KERNEL_BUILDS": str(builds)},
        )
        record = {
            **environment(torch.get_num_threads()),
            "pytest_exit": proc.returncode,
            **summarize(junit, errors, builds),
        }
    record["device"] = "cuda (compiled)" if torch.cuda.is_available() else "cpu (TRITON_INTERPRET)"
    # The pair the use_kernels="auto" gate (ilora/kernels/validated.py) is keyed on.
    record["gpu_arch"] = "sm_{}{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
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
        if record["gpu_arch"] and proc.returncode == 0:
            triton = ".".join(str(record["versions"]["triton"]).split(".")[:2])
            rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
            entry = f'Validation("{record["gpu_arch"]}", "{triton}", "{rel}")'
            print(f"to open use_kernels='auto' on this GPU: add {entry} to kernels/validated.py; commit both")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
