"""One writer per run or evaluation folder: a second process is refused at once and writes nothing; a lock left by a
killed process does not block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from crabplus.__main__ import main
from crabplus.evaluate import evaluate
from crabplus.folder_lock import LOCK_FILE, FolderInUse, hold_folder
from crabplus.train import train
from test_train import run_config, tiny_data  # noqa: F401  (fixture)

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "crabplus" / "configs"
_HOLDER = (
    "import sys\n"
    "from crabplus.folder_lock import hold_folder\n"
    "with hold_folder(sys.argv[1], 'crabplus train --out ' + sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A second process holding ``folder``'s lock until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _assert_refusal(text: str, folder: Path, pid: int) -> None:
    assert "\n" not in text.strip(), text
    assert str(folder) in text and f"pid {pid}" in text and "--out" in text and "wait" in text, text


def test_a_held_folder_refuses_a_second_process_at_once(tmp_path):
    run = tmp_path / "run"
    with held_by_another_process(run) as holder:
        began = time.perf_counter()
        with pytest.raises(FolderInUse) as err, hold_folder(run):
            pass
        assert time.perf_counter() - began < 10  # refused, not waited for (the holder holds until it is killed)
        _assert_refusal(str(err.value), run, holder.pid)
    with hold_folder(run) as folder:  # released with its holder
        assert folder == run


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    with held_by_another_process(run) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert f"pid {holder.pid}" in (run / LOCK_FILE).read_text()  # the file stays; its lock does not
        with hold_folder(run, "crabplus train"):
            assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()}: crabplus train")


def test_one_process_holds_a_folder_once_and_other_ranks_hold_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with hold_folder(run), hold_folder(run):  # demo holds its run folder, then train inside it
        pass
    monkeypatch.setenv("RANK", "1")  # a DDP rank other than 0: its job's rank 0 holds the folder
    with held_by_another_process(run), hold_folder(run):
        pass


@pytest.mark.parametrize(
    ("command", "config"), [("train", "tiny.yaml"), ("demo", "tiny.yaml"), ("transfer", "transfer_tiny.yaml")]
)
def test_commands_refuse_a_held_folder_before_writing(tmp_path, capsys, command, config):
    out = tmp_path / "run"
    with held_by_another_process(out) as holder:
        rc = main([command, "--config", str(CONFIGS / config), "--out", str(out), "--quiet",
                   "--set", "train.max_steps=1"])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith(f"crabplus {command}: error: ")
        _assert_refusal(err, out, holder.pid)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written


def test_a_failed_block_leaves_no_folder_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), hold_folder(tmp_path / "kept" / "eval" / "step-000001"):
        raise ValueError("a damaged checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(ValueError), hold_folder(tmp_path / "kept"):
        raise ValueError("a damaged checkpoint")
    assert (tmp_path / "kept").is_dir()  # not created by the failed call


def test_evaluate_refuses_a_held_evaluation_folder(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    cfg = run_config(tiny_data, tmp_path, max_steps=1)
    train(cfg, progress=False)
    out = tmp_path / "eval" / "step-000001"
    import crabplus.evaluate as ev

    loaded, load = [], ev.load_trained
    monkeypatch.setattr(ev, "load_trained", lambda *a: loaded.append(a) or load(*a))
    with held_by_another_process(out) as holder:
        with pytest.raises(FolderInUse) as err:
            evaluate(cfg, progress=False)
        assert not loaded  # refused before the model loads
        _assert_refusal(str(err.value), out, holder.pid)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert (evaluate(cfg, progress=False).out_dir / "predictions.jsonl").is_file()  # the lock file is no obstacle


def test_a_torchrun_job_on_a_held_folder_is_refused_by_rank_0_in_one_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "crabplus.launch", "--standalone", "--nproc_per_node=2"]
    with held_by_another_process(out) as holder:
        job = subprocess.run([*launcher, "-m", "crabplus", "train", "--config", str(CONFIGS / "tiny.yaml"), "--out",
                              str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert job.returncode == 2, job.stderr
        refusals = [line for line in job.stderr.splitlines() if "is in use by another process" in line]
        assert len(refusals) == 1, job.stderr  # rank 0 alone holds (and is refused)
        _assert_refusal(refusals[0], out, holder.pid)
        assert "Traceback" not in job.stderr and "crabplus launch: worker rank(s) [0, 1]" in job.stderr, job.stderr
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
