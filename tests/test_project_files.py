"""Files of the project that must agree with the code: the configuration reference, generated
from the settings table, the license the installed package declares, and the list of the
READMEs' commands that tools/check_commands.py runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_config_reference.py"
REFERENCE = ROOT / "docs" / "configuration.md"
COMMAND_CHECKER = ROOT / "tools" / "check_commands.py"


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


def load_command_checker():
    spec = importlib.util.spec_from_file_location("check_commands", COMMAND_CHECKER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_documented_command_has_a_check_and_every_check_a_command():
    # tools/check_commands.py (a step of .ci/run) runs them; here only that the list is whole.
    checker = load_command_checker()
    documented = {command for _, command in checker.documented_commands(ROOT)}
    assert documented, "no commands found in the READMEs"
    run = documented - set(checker.NOT_RUN)
    assert run - set(checker.CHECKS) == set(), "documented commands that nothing checks"
    assert set(checker.CHECKS) - run == set(), "checks of commands the READMEs no longer give"
    assert checker.VENV_STEP in documented and "pip install . && fastlb demo" in documented


def test_the_command_list_follows_the_readme_shell_blocks(tmp_path):
    checker = load_command_checker()
    (tmp_path / "loadtests").mkdir()
    (tmp_path / "README.md").write_text(
        "Run `python loadtests/a.py --x 1` or `fastlb status` (a mention), not"
        " `python loadtests/a.py --size=N`.\n\n```sh\nfastlb run \\\n    --listen 127.0.0.1:1\n"
        "python b.py   # why\n```\n\n```toml\nx = 1\n```\n"
    )
    (tmp_path / "loadtests" / "README.md").write_text("```sh\nserve &   # bg\nclient\n```\n")
    assert checker.documented_commands(tmp_path) == [
        ("README.md", "fastlb run \\\n    --listen 127.0.0.1:1"),
        ("README.md", "python b.py   # why"),
        ("README.md", "python loadtests/a.py --x 1"),
        ("loadtests/README.md", "serve &   # bg\nclient"),
    ]


def test_only_an_interrupt_may_print_a_traceback_and_only_once_stopped():
    checker = load_command_checker()
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    run()\n'
    interrupted = (trace + "KeyboardInterrupt\n12:00 request failed: KeyboardInterrupt\n").encode()
    chained = (
        trace + "asyncio.exceptions.CancelledError\n\nDuring handling of the above exception, "
        "another exception occurred:\n\n" + trace + "KeyboardInterrupt\n"
    ).encode()
    refused_then_interrupted = (  # Ctrl-C while a retry loop handled a refused connect
        trace + "ConnectionRefusedError: [Errno 111] Connection refused\n\nDuring handling of "
        "the above exception, another exception occurred:\n\n" + trace + "KeyboardInterrupt\n"
    ).encode()
    failed = (trace + "ValueError: boom\n").encode()
    assert not checker.tracebacks(b"serving\n", interrupted)
    assert not checker.tracebacks(b"", chained)
    assert not checker.tracebacks(b"", refused_then_interrupted)
    assert checker.tracebacks(b"", failed)
    assert checker.tracebacks(
        b"", refused_then_interrupted.replace(b"KeyboardInterrupt", b"OSError")
    )
    assert checker.tracebacks(interrupted, b"")  # before the stop, any traceback fails
