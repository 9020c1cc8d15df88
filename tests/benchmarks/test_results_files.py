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


QUICK_RECORD = report.RESULTS / "2026-11-29_cpu-amd-epyc-1t_quick.json"
STUDY_RECORD = report.RESULTS / "2026-11-29_cpu-amd-epyc-1t_study.json"


def _copy_record(record: Path, folder: Path) -> tuple[Path, Path]:
    """A record and its PNG in ``folder``, as a committed record lies in benchmarks/results/."""
    folder.mkdir()
    json_path = folder / record.name
    json_path.write_text(record.read_text())
    json_path.with_suffix(".png").write_bytes(b"the committed plot")
    return json_path, json_path.with_suffix(".png")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command", ["report", "study --replot"])
def test_a_redraw_goes_to_scratch_and_never_overwrites(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Redrawing a committed record's PNG writes to the ignored folder, never over the tracked file beside it."""
    from benchmarks import study

    record = QUICK_RECORD if command == "report" else STUDY_RECORD
    json_path, beside = _copy_record(record, tmp_path / "results")
    monkeypatch.setattr(report, "SCRATCH", tmp_path / "out")

    def redraw(*extra: str) -> int:
        if command == "report":
            return report.run_main(report.main, [str(json_path), *extra])
        return report.run_main(study.main, ["--replot", str(json_path), *extra])

    assert redraw() == 0
    assert beside.read_bytes() == b"the committed plot"
    assert (tmp_path / "out" / beside.name).read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert redraw() == 2  # the redraw exists now: refused, in one line
    line = _one_error_line(capsys)
    assert "exists" in line and str(tmp_path / "out" / beside.name) in line
    assert redraw("--beside") == 2  # beside the record only on request, and still never over a file
    assert beside.name in _one_error_line(capsys) and beside.read_bytes() == b"the committed plot"
    beside.unlink()
    assert redraw("--beside") == 0 and beside.read_bytes().startswith(b"\x89PNG")


def test_an_existing_record_fails_in_one_line_with_exit_2(tmp_path: Path, capsys) -> None:
    existing, _ = report.result_paths(report.environment(1), "quick", record=True, out=tmp_path)
    existing.write_text("{}")
    assert report.run_main(run.main, ["--quick", "--record", "--out", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert str(existing) in line and "never overwritten" in line
    assert existing.read_text() == "{}"


def test_a_tag_names_a_second_record_of_the_day() -> None:
    json_path, png_path = report.result_paths(_env(), "model", record=True, tag="sparse-path")
    assert json_path == report.RESULTS / "2026-11-29_cpu-amd-epyc-1t_model-sparse-path.json"
    assert png_path == json_path.with_suffix(".png")
    assert run.parse(["--record", "--tag", "r2"]).tag == "r2"
    with pytest.raises(SystemExit):
        run.parse(["--record", "--tag", "../x"])
