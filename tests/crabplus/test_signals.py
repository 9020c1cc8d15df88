"""Interrupting training with a real SIGINT / SIGTERM: one process and 2-process DDP stop after the current step,
save a checkpoint every rank agrees on, print one line saying how to resume, and a second Ctrl-C exits at once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from crabplus.checkpoint import latest_checkpoint, load_state
from crabplus.config import load_config
from crabplus.data.scene import SynthConfig
from crabplus.data.synth import generate
from crabplus.train import train

SUBSETS = ["ks", "meld"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("signals")
    generate(tmp / "data", train=4, test=1, seed=0, subsets=SUBSETS, config=SynthConfig(size=32))
    cfg = {
        "data": {"root": str(tmp / "data"), "subsets": SUBSETS, "frame_size": 32},
        "model": {"r": 4, "lora_alpha": 8, "num_experts": 2},
        "train": {"max_steps": 100000, "batch_size": 2, "lr": 1e-3, "device": "cpu", "threads": 1},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> list[dict]:
    log = run / "train_log.csv"
    if not log.is_file():
        return []
    with log.open() as f:
        return list(csv.DictReader(f))


def _start(config: Path, run: Path, processes: int = 1, *extra: str) -> subprocess.Popen:
    args = ["-m", "crabplus", "train", "--config", str(config), "--out", str(run), "--quiet", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.Popen([sys.executable, *launcher, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _interrupt_after_steps(proc: subprocess.Popen, run: Path, sig: int, steps: int = 2) -> tuple[int, str]:
    deadline = time.monotonic() + 240
    while len(_rows(run)) < steps:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the launcher and every worker
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(config, tmp_path):
    run = tmp_path / "run"
    rc, err = _interrupt_after_steps(_start(config, run), run, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    stopped = int(_rows(run)[-1]["step"])
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and load_state(ckpt)["progress"]["step"] == stopped
    line = [x for x in err.splitlines() if x.startswith("crabplus:")]
    assert len(line) == 1 and f"SIGINT at step {stopped} " in line[0] and str(ckpt) in line[0], err
    assert "same command to resume" in line[0]
    cfg = load_config(config, [f"train.out={run}"])  # the same command, in this process
    assert train(cfg, stop_after=stopped + 1, progress=False).steps == [stopped + 1]
    assert [int(r["step"]) for r in _rows(run)] == list(range(1, stopped + 2))


def test_sigterm_stops_two_ddp_processes_at_the_same_step_with_one_checkpoint(config, tmp_path):
    run = tmp_path / "run"
    rc, err = _interrupt_after_steps(_start(config, run, 2), run, signal.SIGTERM)
    assert rc != 0
    stopped = int(_rows(run)[-1]["step"])
    ckpt = latest_checkpoint(run)
    progress = load_state(ckpt)["progress"]
    assert (progress["step"], progress["world_size"]) == (stopped, 2)
    assert sum(x.startswith("crabplus: SIGTERM") and f"at step {stopped} " in x for x in err.splitlines()) == 1, err
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        textwrap.dedent("""
        import time
        from crabplus.interrupt import StopSignals
        with StopSignals(grace_s=0.2) as signals:
            print("ready", flush=True)
            time.sleep(60)  # a long step
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first asks for a stop after the step
    proc.send_signal(signal.SIGINT)
    began = time.monotonic()
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - began < 5 and proc.returncode == 128 + signal.SIGINT
    assert "stopping after this step" in err and "exiting at once" in err and "Traceback" not in err
