"""`--help`, `--version`, argument errors and config errors answer without importing torch, transformers or PEFT.

Checked on the modules a fresh interpreter holds afterwards (not by timing): those imports take seconds, and importing
PEFT also imports bitsandbytes, whose CPU backend logs a warning line before the one-line error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "crabplus" / "configs" / "tiny.yaml")
TRANSFER = str(ROOT / "examples" / "crabplus" / "configs" / "transfer_tiny.yaml")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "kernels", "ilora")

_PROBE = """
import json, sys
from crabplus.__main__ import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _run(argv: list[str], cwd: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _bad_yaml(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


CASES = {
    "help": (lambda tmp: ["--help"], 0, None),
    "train help": (lambda tmp: ["train", "--help"], 0, None),
    "version": (lambda tmp: ["--version"], 0, None),
    "no command": (lambda tmp: [], 2, "required"),
    "no --config": (lambda tmp: ["train"], 2, "--config"),
    "missing file": (lambda tmp: ["train", "--config", str(tmp / "none.yaml")], 2, "none.yaml"),
    "unknown key": (lambda tmp: ["train", "--config", _bad_yaml(tmp, "train:\n  lrr: 1\n")], 2, "lrr"),
    "bad indentation": (lambda tmp: ["train", "--config", _bad_yaml(tmp, "train:\n  lr: 1\n bad: 2\n")], 2, "line"),
    "bad --set yaml": (lambda tmp: ["train", "--config", TINY, "--set", "train.lr=["], 2, "train.lr=["),
    "unknown --set key": (lambda tmp: ["evaluate", "--config", TINY, "--set", "eval.nope=1"], 2, "eval.nope"),
    "wrong type": (lambda tmp: ["demo", "--config", TINY, "--set", "train.batch_size=two"], 2, "train.batch_size"),
    "out of range": (lambda tmp: ["train", "--config", TINY, "--set", "train.lr=-1"], 2, "train.lr"),
    "unknown subset": (lambda tmp: ["train", "--config", TINY, "--set", "data.subsets=[nope]"], 2, "nope"),
    "bad part mode": (lambda tmp: ["train", "--config", TINY, "--set", "model.llm=half"], 2, "model.llm"),
    "transfer config": (lambda tmp: ["transfer", "--config", TRANSFER, "--set", "transfer.nope=1"], 2, "nope"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_answers_without_heavy_imports(name, tmp_path):
    make_argv, want_rc, named = CASES[name]
    argv = make_argv(tmp_path)
    result, err = _run(argv, cwd=tmp_path)
    assert result["rc"] == want_rc, err
    assert result["heavy"] == [], f"{name} imported {result['heavy']}"
    if named is not None:
        lines = err.strip().splitlines()
        assert named in lines[-1], err
        if "--config" in argv:  # past argument parsing: the error line alone, no warning or traceback before it
            assert len(lines) == 1, err


def test_config_error_from_the_repo_root_imports_nothing_heavy():
    """From the repository root the top-level ``kernels/`` folder is on ``sys.path`` (it installs as
    ``ilora.kernels``); a config error must not reach the imports that probe a ``kernels`` module."""
    result, err = _run(["train", "--config", TINY, "--set", "train.nope=1"], cwd=ROOT)
    assert result == {"rc": 2, "heavy": []}, err
    assert err.strip().splitlines() == [err.strip()] and "train.nope" in err


def test_adapter_settings_still_checked_when_the_config_loads():
    """Settings only ``ILoraConfig`` can judge are still refused at load time, naming the key (this check imports
    PEFT)."""
    from crabplus.config import load_config

    with pytest.raises(ValueError, match=r"model\.num_experts"):
        load_config(TINY, ["model.num_experts=0"])


def test_part_modes_agree_with_the_adapter_module():
    """``crabplus.models.adapters`` checks the part modes that the torch-free config declares."""
    from typing import get_args

    from crabplus.models import adapters, config

    assert adapters.PART_MODES == get_args(config.PartMode) == ("frozen", "ilora", "full")
