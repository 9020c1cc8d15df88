"""Where result files go: an ignored scratch folder by default; the committed records only on request, and a record
is never overwritten."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import report, run

ROOT = Path(__file__).resolve().parents[2]


def _env(date: str = "2026-11-29T18:36:29+00:00") -> dict:
    return {"date": date, "machine": {"cpu": "AMD EPYC", "threads": 1, "gpu": None}}


def test_default_destination_is_an_ignored_folder() -> None:
    json_path, png_path = report.result_paths(_env(), "quick", record=False)
    assert json_path.parent == report.SCRATCH and png_path == json_path.with_suffix(".png")
    assert json_path.parent != report.RESULTS
    ignored = subprocess.run(["git", "check-ignore", "-q", str(json_path)], cwd=ROOT)
    if ignored.returncode == 128:  # a tree copied without .git: read the rule itself
        assert "benchmarks/out/" in (ROOT / ".gitignore").read_text().split()
    else:
        assert ignored.returncode == 0, f"{json_path} is not ignored by git"
    # two runs on one day do not collide in the scratch folder: the stem carries the time of day
    later, _ = report.result_paths(_env("2026-11-29T18:41:02+00:00"), "quick", record=False)
    assert later != json_path


def test_record_goes_to_results_named_by_date_and_machine() -> None:
    json_path, _ = report.result_paths(_env(), "quick", record=True)
    assert json_path == report.RESULTS / "2026-11-29_cpu-amd-epyc-1t_quick.json"


def test_run_parses_record_flag() -> None:
    assert run.parse(["--quick"]).record is False
    assert run.parse(["--quick", "--record"]).record is True


def test_an_existing_record_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "2026-11-29_cpu-x-1t_quick.json"
    report.write_json(target, _env(), {"preset": "quick"}, [])
    before = target.read_text()
    with pytest.raises(FileExistsError, match="never overwritten"):
        report.write_json(target, _env(), {"preset": "other"}, [])
    assert target.read_text() == before
    png = tmp_path / "r.png"
    png.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"r\.png"):
        report.check_free([target.with_name("free.json"), png])
