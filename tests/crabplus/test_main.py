"""The command line: the README's demo on a very small setting, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from crabplus.__main__ import main

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "crabplus" / "configs" / "tiny.yaml")


def test_demo_runs_end_to_end_and_a_rerun_says_it_was_complete(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo", "--config", TINY, "--out", str(out), "--quiet",
        "--set", "data.subsets=[ks, s4, mer24]", "--set", "data.synth={train: 3, test: 1, seed: 0, size: 32}",
        "--set", "data.frame_size=32", "--set", "train.epochs=1", "--set", "model.r=4",
        "--set", "eval.max_new_tokens=4",
    ]  # fmt: skip
    rc = main(argv)
    printed = capsys.readouterr()
    assert rc == 0
    assert "loss: first" in printed.out and "| action_recognition | ks |" in printed.out
    for name in ("loss.png", "router_usage.png", "train_log.csv", "config.yaml", "eval/step-000003/predictions.jsonl",
                 "eval/step-000003/metrics.md", "eval/step-000003/metrics.csv", "data/ks/train.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert len((out / "train_log.csv").read_text().splitlines()) == 1 + 3  # 9 records, batch 4: 3 steps
    said = printed.out + printed.err
    assert said.count("not evaluated") == 1 and "mer24 has no test split" in said, said  # once, with why
    assert main(argv) == 0  # the same command on the finished run
    again = capsys.readouterr().out
    assert "trained 0 steps" not in again and " s/step" not in again
    assert f"already trained: {out} finished all 3 steps" in again and "step-000003" in again


def test_errors_are_reported_by_name(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert main(["evaluate", "--config", TINY, "--set", f"train.out={tmp_path}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_commands_other_than_train_refuse_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--config", TINY]) == 2
    assert "one process" in capsys.readouterr().err


def test_help_and_version_answer_without_importing_torch():
    code = (
        "import sys\nfrom crabplus.__main__ import main\n"
        "for argv in (['--help'], ['--version'], ['train']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ilora') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "crabplus 0.1.0" in proc.stdout and "--config" in proc.stderr  # version, then the argument error


def test_one_line_errors_with_exit_status(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["train", "--config", TINY, "--out", str(afile)]) == 2
    assert capsys.readouterr().err.strip() == f"crabplus train: error: --out: {afile} is a file, not a folder"
    missing = tmp_path / "nope"
    assert main(["evaluate", "--config", TINY, "--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"crabplus evaluate: error: --checkpoint: {missing} does not exist") and "\n" not in err
