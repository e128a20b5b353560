"""The load-test scripts run the installed fastlb from any directory, never the checkout's
``fastlb/`` (which has no compiled data plane): short runs of the quick ones."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None):
    result = subprocess.run(
        [sys.executable, str(LOADTESTS / script), *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(params=["root", "loadtests", "elsewhere"])
def cwd(request, tmp_path) -> Path:
    return {"root": ROOT, "loadtests": LOADTESTS, "elsewhere": tmp_path}[request.param]


def test_compare_help(cwd):
    assert "--workloads" in run_script("compare.py", "--help", cwd=cwd)


def test_table_stall_help(cwd):
    assert "--interval" in run_script("table_stall.py", "--help", cwd=cwd)


def test_bench_pick_imports_the_compiled_data_plane(cwd):
    output = run_script(
        "bench_pick.py", "--picks", "1000", "--repeat", "1", "--sizes", "3", cwd=cwd
    )
    assert "maglev" in output


def test_the_checkout_on_pythonpath_does_not_shadow_the_installed_package(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = run_script(
        "bench_pick.py", "--picks", "1000", "--repeat", "1", "--sizes", "3", cwd=tmp_path, env=env
    )
    assert "roundrobin" in output


def test_detection_starts_fastlb_through_the_harness(cwd):
    output = run_script("detection.py", "--runs", "1", "--scenarios", "closes", cwd=cwd)
    (row,) = [line for line in output.splitlines() if "│ closes" in line]
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[4] == "0", row  # not detected: none


STARTS_WRK_SLOWLY = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import harness

class SlowStart(subprocess.Popen):  # the start takes a second, so Ctrl-C lands in it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)
        time.sleep(1)

harness.subprocess.Popen = SlowStart
harness.run_wrk(["wrk", "-t1", "-c1", "-d30s", f"http://127.0.0.1:{sys.argv[2]}/"], 60)
"""


def test_ctrl_c_while_wrk_starts_leaves_no_wrk_running():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        starter = subprocess.Popen(
            [sys.executable, "-c", STARTS_WRK_SLOWLY, str(LOADTESTS), str(port)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        wrk = None
        try:
            wrk = psutil.Process(int(starter.stdout.readline()))
            os.killpg(starter.pid, signal.SIGINT)  # Ctrl-C: to the whole process group
            assert starter.wait(timeout=30) != 0
            wrk.wait(timeout=5)  # raises psutil.TimeoutExpired if it was left running
        finally:
            starter.kill()
            starter.wait()
            if wrk is not None and wrk.is_running():
                wrk.kill()
