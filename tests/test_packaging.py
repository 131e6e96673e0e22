"""What the package says about itself: one version, the licence it names."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import messagevault

ROOT = Path(__file__).parent.parent


def test_the_version_is_written_once_and_agrees_everywhere() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]  # hatch reads it from __init__.py
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/messagevault/__init__.py"
    installed = importlib.metadata.version("messagevault")
    assert messagevault.__version__ == installed, "stale install: run `make install`"
    command = Path(sys.executable).parent / "messagevault"
    answer = subprocess.run(
        [command, "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert messagevault.__version__ in answer.stdout.split()


def test_the_licence_named_in_pyproject_is_shipped() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n")
    assert "Copyright (c) 2026 MessageVault developers" in licence
    assert "LICENSE" in (importlib.metadata.metadata("messagevault").get_all("License-File") or [])
