"""What a user meets before the first line of code: the install commands and the supported versions agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _install_commands() -> list[str]:
    return re.findall(r'^pip install "([^"]+)"', README, flags=re.MULTILINE)


def test_readme_install_commands_are_accepted_by_pip() -> None:
    commands = _install_commands()
    assert len(commands) == 2
    path_form, git_form = commands
    # The checkout form, with this checkout standing in for the placeholder path: pip resolves it (no download).
    target = path_form.replace("/path/to/ilora", str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "--report", "-", target],
        capture_output=True, text=True, cwd=ROOT.parent, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (item,) = json.loads(proc.stdout)["install"]
    assert item["metadata"]["name"] == "ilora" and item["requested_extras"] == ["triton"]
    # The git form is a PEP 508 direct reference: pip takes `name @ URL` for URLs (not for paths).
    req = Requirement(git_form)
    assert (req.name, req.extras, req.url.startswith("git+https://")) == ("ilora", {"triton"}, True)


def _claimed(package: str) -> tuple[Version, Version]:
    match = re.search(rf"{package} (\d+\.\d+) to (\d+\.\d+)", README.replace("\n", " "))
    assert match, f"README names no {package} range"
    return Version(match.group(1)), Version(match.group(2))


def _metadata_spec(package: str) -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    (spec,) = re.findall(rf'"{package}([<>=!,.\d]+)"', text)
    return SpecifierSet(spec)


def _oldest_pin(package: str) -> Version:
    text = (ROOT / "Makefile").read_text()
    return Version(re.search(rf"OLDEST_PINS :=.*\b{package}==([\d.]+)", text).group(1))


@pytest.mark.parametrize("package", ["peft", "transformers"])
def test_supported_versions_agree_between_readme_metadata_pins_and_what_runs(package: str) -> None:
    low, high = _claimed(package)
    spec = _metadata_spec(package)
    next_minor = Version(f"{high.major}.{high.minor + 1}")
    below = Version(f"{low.major}.{low.minor - 1}.99") if low.minor else Version(f"{low.major - 1}.99")
    assert low in spec and Version(f"{high}.99") in spec and next_minor not in spec and below not in spec
    assert (_oldest_pin(package).major, _oldest_pin(package).minor) == (low.major, low.minor)
    running = Version(version(package))
    # `make test` runs on the newest installed (the metadata's newest) and on the oldest overlay: both claimed ends.
    assert (running.major, running.minor) in {(low.major, low.minor), (high.major, high.minor)}, running
