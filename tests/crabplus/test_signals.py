"""Interrupting training with a real SIGINT / SIGTERM: one process and 2-process DDP stop after the current step,
save a checkpoint every rank agrees on, print one line saying how to resume, and a second Ctrl-C exits at once."""

from __future__ import annotations

import csv
import json
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
    launcher = ["-m", "crabplus.launch", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.Popen([sys.executable, *launcher, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _interrupt_after_steps(
    proc: subprocess.Popen, run: Path, sig: int, steps: int = 2, group: bool = True
) -> tuple[int, str]:
    deadline = time.monotonic() + 240
    while len(_rows(run)) < steps:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the launcher and every worker
    else:
        proc.send_signal(sig)  # as a scheduler may: to the launcher alone
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


def test_sigterm_to_the_launcher_stops_two_ddp_processes_at_the_same_step_with_one_checkpoint(config, tmp_path):
    run = tmp_path / "run"
    rc, err = _interrupt_after_steps(_start(config, run, 2), run, signal.SIGTERM, group=False)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert sum(x.startswith("crabplus launch: SIGTERM") for x in err.splitlines()) == 1, err
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
    assert "after this step" in err and "exiting at once" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained for one step, with 12 test samples to evaluate one at a time."""
    tmp = tmp_path_factory.mktemp("evaluate")
    generate(tmp / "data", train=2, test=6, seed=0, subsets=SUBSETS, config=SynthConfig(size=32))
    cfg = {
        "data": {"root": str(tmp / "data"), "subsets": SUBSETS, "frame_size": 32},
        "model": {"r": 4, "lora_alpha": 8, "num_experts": 2},
        "train": {"out": str(tmp / "run"), "max_steps": 1, "batch_size": 2, "device": "cpu", "threads": 1},
        "eval": {"batch_size": 1, "max_new_tokens": 32},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path), progress=False)
    return path


def _predicted(out: Path) -> list[dict]:
    path = out / "predictions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _interrupt_evaluation(command: list[str], out: Path, sig: int, at_least: int) -> list[dict]:
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(_predicted(out)) < at_least:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "evaluation did not start"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    done = _predicted(out)
    lines = [x for x in err.splitlines() if x.startswith("crabplus:")]
    name = signal.Signals(sig).name
    assert len(lines) == 1 and f"{name} during evaluation after {len(done)} of 12" in lines[0], err
    assert "same command to continue" in lines[0]
    record = json.loads((out / "eval.json").read_text())
    assert record["complete"] is False and record["interrupted"] == name and not (out / "metrics.md").exists()
    return done


def test_a_signal_stops_evaluate_after_a_batch_and_the_same_command_continues(trained, tmp_path):
    config, out = trained, tmp_path / "eval"
    command = [sys.executable, "-m", "crabplus", "evaluate", "--config", str(config), "--out", str(out), "--quiet"]
    first = _interrupt_evaluation(command, out, signal.SIGINT, 2)
    assert 2 <= len(first) < 12
    done = _interrupt_evaluation(command, out, signal.SIGTERM, len(first) + 1)  # continued, then stopped again
    assert done[: len(first)] == first and len(first) < len(done) < 12
    import crabplus.evaluate as ev

    predicted = []
    real = ev.predict
    with pytest.MonkeyPatch.context() as mp:  # the same command again, in this process
        mp.setattr(ev, "predict", lambda *a, **kw: predicted.extend(a[2]) or real(*a, **kw))
        result = ev.evaluate(load_config(config), out_dir=out, progress=False)
    assert len(predicted) == 12 - len(done) and result.interrupted is None
    every = _predicted(out)
    assert every[: len(done)] == done and len(every) == 12
    assert sorted((r["subset"], r["sample"]) for r in every) == [(s, i) for s in sorted(SUBSETS) for i in range(6)]
    assert json.loads((out / "eval.json").read_text())["complete"] is True


def test_a_signal_after_a_stop_exits_at_once_with_one_line(tmp_path):
    script = tmp_path / "after_save.py"
    script.write_text(
        textwrap.dedent("""
        import time
        from crabplus.interrupt import StopSignals, command_signals
        command_signals()
        with StopSignals(grace_s=0.2) as signals:
            print("ready", flush=True)
            while signals.received is None:
                time.sleep(0.01)
        print("saved", flush=True)  # the final checkpoint is written; the process is shutting down
        time.sleep(60)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(1.2)  # past the grace for a launcher's forwarded copy of the same Ctrl-C
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert [x for x in err.splitlines() if x.startswith("crabplus:")] == ["crabplus: SIGINT again: exiting at once"]


def test_a_signal_outside_a_loop_is_one_line_with_its_exit_status(tmp_path):
    script = tmp_path / "loading.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        from crabplus.interrupt import Interrupted, command_signals
        command_signals()
        try:
            print("loading", flush=True)
            time.sleep(60)
        except Interrupted as exc:
            print(exc.signal, file=sys.stderr)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and err.strip() == "SIGTERM", err
