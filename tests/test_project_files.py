"""Files of the project that must agree with the code: the configuration reference, generated
from the settings table, and the license the installed package declares."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_config_reference.py"
REFERENCE = ROOT / "docs" / "configuration.md"


def generate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


def test_the_configuration_reference_is_what_the_settings_table_gives(tmp_path):
    result = generate("--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_stale_configuration_reference_is_caught(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(REFERENCE.read_text().replace("`--workers`", "`--processes`"))
    result = generate("--check", "--output", str(stale), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{stale} is not current: run `python tools/gen_config_reference.py`"
    ]
    assert generate("--output", str(stale), cwd=tmp_path).returncode == 0
    assert stale.read_text() == REFERENCE.read_text()


def test_the_installed_package_carries_the_mit_license():
    assert metadata.metadata("fastlb")["License-Expression"] == "MIT"
    (license_file,) = [f for f in metadata.files("fastlb") if f.name == "LICENSE"]
    text = license_file.read_text()
    assert text == (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the fastlb authors\n")
