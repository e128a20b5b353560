"""The unit files of contrib/systemd pass ``systemd-analyze verify``, with the installed fastlb
in place of /usr/local/bin/fastlb."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_the_unit_files_pass_systemd_analyze_verify(tmp_path):
    fastlb = Path(sys.executable).parent / "fastlb"
    assert fastlb.exists(), "the fastlb script of the installed package"
    for name in ("fastlb.service", "fastlb.socket"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/fastlb", str(fastlb)))
    done = subprocess.run(
        ["systemd-analyze", "verify", "fastlb.socket", "fastlb.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    service = (UNITS / "fastlb.service").read_text()
    assert "ExecReload=/usr/local/bin/fastlb reload --pid $MAINPID" in service
