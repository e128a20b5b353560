"""Runs every command that README.md and loadtests/README.md give, as written, in a fresh clone
and a fresh virtual environment, and says which work.

    python tools/check_commands.py             # all of them (about 8 minutes on 2 cores)
    python tools/check_commands.py --list      # the commands and how each is checked
    python tools/check_commands.py --only demo # those containing "demo" (after the installs)

The commands are the lines of the ``sh`` blocks (a line ending in ``&`` runs together with the
rest of its block) and the commands quoted in the prose that run something whole on their own:
``python loadtests/...``, ``python tests/...``, ``fastlb status ...``, ``fastlb run --help``
and the virtual-environment step of the install note, which makes the environment that all
the others run in (with ``HOME`` a temporary directory, so ``~/fastlb-venv`` is fresh). Not run:
the service install (``sudo ... /opt/fastlb``, ``systemctl ...``: they need a booted systemd
and change the machine), commands with a placeholder (``FILE``, ``N``, ``MODE``), and the
README's test command, which ``.ci/run`` runs as written.

Each command runs in bash, from the root of the clone, in a session of its own, and is checked
as ``CHECKS`` says: it exits 0 in time; or it shows a line of results (a benchmark that would
run for minutes), serves a URL (the demo) or a port (a backend), and is then stopped with
SIGINT, as a user would stop it. Output with a Python traceback fails either way, and so does
a process of it left running after it stopped. The README's example with addresses in 10.0.0.0/8
runs in a network namespace of its own with only loopback, so that nothing leaves the machine.
Every command and check is in ``CHECKS``; tests/test_project_files.py fails when the READMEs
give a command that is not there, or ``CHECKS`` names one they no longer give.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "loadtests/README.md")
STOP_TIMEOUT = 30.0  # seconds a stopped command has to end, children included
VENV_STEP = "python3 -m venv ~/fastlb-venv && . ~/fastlb-venv/bin/activate"
PROSE_COMMAND = re.compile(
    r"(python3? (loadtests|tests)/\S+|fastlb status \S|fastlb run --help$|python3 -m venv )"
)
PLACEHOLDER = re.compile(r"""(?<=[= "'])[A-Z]+(?=["'\s]|$)""")  # --splice MODE, --size=N
NAMESPACED = "unshare --net bash -c 'ip link set lo up && exec \"$@\"' fastlb-netns"


@dataclass(frozen=True)
class Check:
    """How a command is checked: ``exits``: it exits 0 within ``within`` seconds; ``shows``: a
    line of its output matches this regular expression within ``within``; ``serves``: an
    HTTP GET of this URL answers 200, or (``tcp://HOST:PORT``) the port accepts and sends a
    byte, within ``within``. ``netns``: it runs in a network namespace of its own; ``inside``:
    it runs (and is checked) while that command runs, once that one is up, in its namespace."""

    within: float
    exits: bool = False
    shows: str | None = None
    serves: str | None = None
    netns: bool = False
    inside: str | None = None


MANY_BACKENDS_LINE = r"round 1\.0 +\w+ +\d+ backends +[\d,.]+ conn/s"
SCALE_LINE = r"fastlb +x1 +keepalive +[\d,.]+ req/s"
RESULT_LINE = r"round 1 \w[\w-]* +\w+ +[\d,.]+ "  # compare.py's first measurement

# Given, but not run here: what else runs them.
NOT_RUN = {"pip install '.[test]' && pytest -q tests": ".ci/run runs the test command as written"}

RUN_EXAMPLE = (
    "fastlb run --listen 0.0.0.0:80 \\\n    --backend 10.0.0.11:8080 --backend "
    "10.0.0.12:8080,weight=2 --backend 10.0.0.13:8080,backup \\\n    --algorithm leastconn "
    "--workers 4 --stats 127.0.0.1:9000"
)

CTL_EXAMPLE = "fastlb run --config contrib/fastlb.toml --control /run/fastlb/control.sock"
CTL_VERBS = (
    "fastlb ctl show                                  # state, health, weights, connections",
    "fastlb ctl drain default/10.0.0.11:8080          # no new connections; open ones finish",
    "fastlb ctl disable default/10.0.0.11:8080        # maintenance: no traffic, no checks",
    "fastlb ctl enable default/10.0.0.11:8080",
    "fastlb ctl weight default/10.0.0.12:8080 5",
    "fastlb ctl add default 10.0.0.14:8080,weight=2",
    "fastlb ctl remove default/10.0.0.14:8080         "
    "# drains, then gone after its last connection",
    "fastlb ctl kill-sessions default/10.0.0.12:8080  # reset its open connections now",
    "fastlb ctl reload                                # as SIGHUP; a bad file is refused, exit 2",
)

CHECKS: dict[str, Check] = {
    VENV_STEP: Check(120, exits=True),
    "pip install . && fastlb demo": Check(300, serves="http://127.0.0.1:8000/"),
    RUN_EXAMPLE: Check(30, netns=True, shows=r"ready: 4 workers accepting"),
    "fastlb status 127.0.0.1:9000": Check(30, exits=True, inside=RUN_EXAMPLE),
    "fastlb status --watch 127.0.0.1:9000": Check(30, shows=r"\bdefault\b", inside=RUN_EXAMPLE),
    "fastlb run --help": Check(30, exits=True),
    CTL_EXAMPLE: Check(30, netns=True, shows=r"ready: \d+ workers accepting"),
    **{verb: Check(30, exits=True, inside=CTL_EXAMPLE) for verb in CTL_VERBS},
    "pip install '.[load]' && apt-get install -y haproxy nginx libnginx-mod-stream wrk": Check(
        600, exits=True
    ),
    "python loadtests/compare.py          # about 6 minutes; --quick for a 1-minute sanity run": (
        Check(120, shows=RESULT_LINE)
    ),
    "python loadtests/compare.py": Check(120, shows=RESULT_LINE),
    "python loadtests/compare.py --workloads churn --balancers fastlb,haproxy,haproxy-splice": (
        Check(120, shows=RESULT_LINE)
    ),
    "python loadtests/memory.py": Check(120, shows=r"connections opened in"),
    "python loadtests/syscalls.py --tool perf --balancers fastlb,haproxy,haproxy-splice,nginx": (
        Check(120, shows=r"\bsleeps\b.*\d\.\d\d")
    ),
    "pip install '.[load]' && python loadtests/run_locust.py --run-time 30s --users 20": Check(
        300, exits=True
    ),
    "python loadtests/accesslog.py": Check(120, shows=r"round 1 fastlb +[\d,]+ conn/s"),
    "python loadtests/checker_cpu.py --supervisor --duration 8": Check(
        120, shows=r"tcp sup +\d+ backends/s .* checks, CPU"
    ),
    "python loadtests/detection.py": Check(300, exits=True),
    "python tests/backends.py name --name a": Check(30, shows=r"^\d+$"),
    "python loadtests/run_locust.py                          # 20 users for 20 s through fastlb": (
        Check(180, exits=True)
    ),
    "python loadtests/run_locust.py --run-time 1m --users 50 --workers 2": Check(240, exits=True),
    "python loadtests/run_locust.py --user-classes TcpUser   # only new connections": Check(
        180, exits=True
    ),
    "python loadtests/run_locust.py --balancer haproxy       # the same test through HAProxy": (
        Check(180, exits=True)
    ),
    "fastlb demo &                                       # balancer on 127.0.0.1:8000\n"
    "locust -f loadtests/locustfile.py --host http://127.0.0.1:8000": Check(
        120, serves="http://127.0.0.1:8089/"
    ),
    "python loadtests/compare.py                  "
    "# 3 interleaved rounds, about 6 minutes on 2 cores": Check(120, shows=RESULT_LINE),
    "python loadtests/compare.py --quick          # 1 round of 2 s runs: a sanity check": Check(
        240, exits=True
    ),
    "python loadtests/compare.py --workers 2 --rounds 5 --duration 10": Check(
        120, shows=RESULT_LINE
    ),
    "python loadtests/compare.py --balancers fastlb,haproxy --workloads bulk "
    "--fastlb-args='--splice never'": Check(120, shows=RESULT_LINE),
    "python loadtests/compare.py --workloads proxy,sni --quick     # 1 round of 2 s runs, ~20 s": (
        Check(180, exits=True)
    ),
    "python loadtests/compare.py --workloads proxy,sni             "
    "# 3 rounds of 5 s runs, ~2 min": Check(120, shows=RESULT_LINE),
    "python loadtests/compare.py --workloads newconn,proxy,sni --balancers direct,fastlb,haproxy": (
        Check(120, shows=RESULT_LINE)
    ),
    "python loadtests/memory.py                           # fastlb, haproxy, nginx": Check(
        120, shows=r"connections opened in"
    ),
    "python loadtests/memory.py --connections 2000 --balancers fastlb,haproxy": Check(
        120, shows=r"connections opened in"
    ),
    "python loadtests/syscalls.py                         "
    "# strace -c -f, fastlb, haproxy, haproxy-splice": Check(
        120, shows=r"system calls per request"
    ),
    "python loadtests/backend.py http --count 3      # prints the addresses, serves until Ctrl-C": (
        Check(60, shows=r"^127\.0\.0\.1:\d+$")
    ),
    "python loadtests/backend.py http --kind python  # the asyncio backend instead of nginx": (
        Check(60, shows=r"^127\.0\.0\.1:\d+$")
    ),
    "python loadtests/backend.py hold --port 9000    # accept, send one byte, hold open": Check(
        60, serves="tcp://127.0.0.1:9000"
    ),
    "python loadtests/compare.py --many-backends 1000 --algorithms leastconn --workers 2": Check(
        180, shows=MANY_BACKENDS_LINE
    ),
    "python loadtests/compare.py --many-backends 1000 --quick                  # every algorithm": (
        Check(180, shows=MANY_BACKENDS_LINE)
    ),
    "python loadtests/scale.py                         "
    "# N = 1, 2, 4, 8 as the cores allow (2 cores: 1, 2)": Check(120, shows=SCALE_LINE),
    "python loadtests/scale.py --bundle /tmp/scale     "
    "# then, on a machine without network: /tmp/scale/run.sh": Check(600, exits=True),
    "python loadtests/scale.py --workers 1,2 --duration 2": Check(300, exits=True),
    "python loadtests/scale.py --pin each --workers 1,2 --duration 2": Check(300, exits=True),
    "python loadtests/staleness.py                     "
    "# 20 rounds, 2 workers, 16 connections 2 ms apart": Check(120, exits=True),
    "python loadtests/staleness.py --gap-ms 0          # back-to-back bursts": Check(
        120, exits=True
    ),
    "python loadtests/table_stall.py                                "
    "# roundrobin, consistent, maglev": Check(240, exits=True),
    "python loadtests/table_stall.py --algorithms maglev --rounds 5 --duration 4 --interval 0.05": (
        Check(180, exits=True)
    ),
    "python loadtests/table_stall.py --algorithms maglev,consistent --change weight": Check(
        240, exits=True
    ),
}


def documented_commands(root: Path = ROOT) -> list[tuple[str, str]]:
    """(document, command) for every command the READMEs give, in order."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = (root / doc).read_text()
        for block in re.findall(r"(?ms)^```sh\n(.*?)^```", text):
            found += [(doc, command) for command in block_commands(block)]
        prose = re.sub(r"(?ms)^```.*?^```", "", text)
        for span in re.findall(r"`([^`]+)`", prose):
            command = " ".join(span.split())
            if PROSE_COMMAND.match(command) and not PLACEHOLDER.search(command):
                found.append((doc, command))
    return found


def block_commands(block: str) -> list[str]:
    """The commands of a shell block: a line each (with its continuations); a command sent to
    the background runs with the rest of the block."""
    commands: list[str] = []
    current = ""
    for line in block.splitlines():
        current = f"{current}\n{line}" if current else line
        if current.endswith("\\"):
            continue
        commands.append(current)
        current = ""
    for index, command in enumerate(commands):
        if command.split("#")[0].rstrip().endswith("&"):
            return commands[:index] + ["\n".join(commands[index:])]
    return commands


# ---- running --------------------------------------------------------------------------------


class Failure(Exception):
    pass


class Environment:
    """A fresh clone, and a home directory in which the install note makes the venv."""

    def __init__(self, scratch: Path):
        self.clone = scratch / "fastlb"
        self.home = scratch / "home"
        self.home.mkdir()
        subprocess.run(
            ["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(self.clone)], check=True
        )
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("VIRTUAL_ENV", "PYTHON", "PIP_"))
        }
        self.env.update(HOME=str(self.home), PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.env["PATH"] = os.pathsep.join(
            part for part in self.env["PATH"].split(os.pathsep) if "venv" not in part
        )

    def script(self, command: str) -> str:
        if command == VENV_STEP:
            return command
        return f". ~/fastlb-venv/bin/activate\n{command}\n"

    def start(self, command: str, netns: bool, enter: int | None) -> subprocess.Popen:
        argv = ["bash", "-c", self.script(command)]
        if netns:
            argv = shlex.split(NAMESPACED) + argv
        elif enter is not None:  # the namespace of a command already running
            argv = ["nsenter", f"--net=/proc/{enter}/ns/net"] + argv
        return subprocess.Popen(
            argv,
            cwd=self.clone,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Run:
    """One command running: its output as it comes, its processes, and how it is stopped."""

    def __init__(self, env: Environment, command: str, netns: bool, enter: int | None):
        self.command = command
        self.process = env.start(command, netns, enter)
        self.output = b""
        self.selector = selectors.DefaultSelector()
        os.set_blocking(self.process.stdout.fileno(), False)
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        self.seen: set[int] = set()
        self.eof = False

    def read(self, timeout: float) -> None:
        """What the command printed within ``timeout`` seconds (less when it ends)."""
        if not self.eof and self.selector.select(timeout):
            chunk = self.process.stdout.read(65536)
            if chunk == b"":
                self.eof = True
            elif chunk:
                self.output += chunk
        self.seen |= descendants(self.process.pid)

    def lines(self) -> list[str]:
        return self.output.decode("utf-8", "replace").splitlines()

    def wait_exit(self, within: float) -> int:
        deadline = time.monotonic() + within
        while self.process.poll() is None or not self.eof:
            if time.monotonic() > deadline:
                raise Failure(f"still running after {within:g} s")
            self.read(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.process.returncode

    def wait_for(self, pattern: str, within: float) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + within
        while not any(regex.search(line) for line in self.lines()):
            if self.process.poll() is not None and self.eof:
                raise Failure(
                    f"exited with {self.process.returncode} before a line matching {pattern!r}"
                )
            if time.monotonic() > deadline:
                raise Failure(f"no line matching {pattern!r} within {within:g} s")
            self.read(min(0.5, max(0.0, deadline - time.monotonic())))

    def wait_serving(self, url: str, within: float) -> None:
        deadline = time.monotonic() + within
        while not answers(url):
            if self.process.poll() is not None and self.eof:
                raise Failure(f"exited with {self.process.returncode} before {url} answered")
            if time.monotonic() > deadline:
                raise Failure(f"{url} did not answer within {within:g} s")
            self.read(0.2)  # what it prints meanwhile; the URL is tried again after

    def stop(self) -> None:
        """SIGINT to its session, as Ctrl-C would; then every process of it must end."""
        self.seen |= descendants(self.process.pid)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.process.poll() is None or not self.eof:
            if time.monotonic() > deadline:
                break
            self.read(0.5)
        # What it started may still be ending (or be an orphan) when the command itself is gone.
        while any(alive(pid) for pid in self.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(pid for pid in self.seen | {self.process.pid} if alive(pid))
        named = [f"{pid} ({command_line(pid)})" for pid in left]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.selector.close()
        self.process.stdout.close()
        if left:
            raise Failure(
                f"processes {', '.join(named)} still running {STOP_TIMEOUT:g} s after SIGINT"
            )


def answers(url: str) -> bool:
    if url.startswith("tcp://"):
        host, port = url[len("tcp://") :].rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=2) as sock:
                return sock.recv(1) != b""
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def check(env: Environment, command: str, spec: Check, enter: int | None = None) -> None:
    run = Run(env, command, spec.netns, enter)
    try:
        if spec.exits:
            code = run.wait_exit(spec.within)
            if code != 0:
                raise Failure(f"exited with {code}")
        elif spec.shows is not None:
            run.wait_for(spec.shows, spec.within)
        else:
            run.wait_serving(spec.serves, spec.within)
        for dependent, inner in CHECKS.items():
            if inner.inside == command:
                try:
                    check(env, dependent, inner, run.process.pid)
                except Failure as failure:
                    raise Failure(f"{dependent!r} (inside): {failure}") from None
    except Failure as failure:
        raise Failure(f"{failure}\n{tail(run)}") from None
    finally:
        before_stop = len(run.output)
        try:
            run.stop()
        finally:
            if tracebacks(run.output[:before_stop], run.output[before_stop:]):
                raise Failure(f"a traceback\n{tail(run)}")


def tracebacks(running: bytes, stopping: bytes) -> bool:
    """Whether the output shows a traceback: any while it ran; once stopped with SIGINT, any
    but one of the interrupt (a script need not catch KeyboardInterrupt). Other processes of
    the command may print between a trace's lines (HAProxy says it exits), so a trace of the
    interrupt is one that names it and no other exception."""
    marker = "Traceback (most recent call last)"
    if marker in running.decode("utf-8", "replace"):
        return True
    for trace in stopping.decode("utf-8", "replace").split(marker)[1:]:
        if CHAINED in trace:  # what was being handled when the interrupt came: the next trace
            continue  # is the one raised, and is judged
        lines = {line.strip() for line in trace.splitlines()[1:] if line and not line[0].isspace()}
        if any(EXCEPTION_LINE.match(line) for line in lines - INTERRUPTED):
            return True
        if lines and not lines & INTERRUPTED:  # none: a piece of two traces printed at once
            return True
    return False


# The exceptions an interrupt raises: the interrupt, and what it cancels (asyncio cancels its
# tasks on Ctrl-C).
INTERRUPTED = {"KeyboardInterrupt", "asyncio.exceptions.CancelledError"}
CHAINED = "During handling of the above exception, another exception occurred"
# A line naming an exception; not Python's "Exception ignored in: ..." at exit, whose own trace
# follows and is judged by itself.
EXCEPTION_LINE = re.compile(
    r"(?!Exception ignored in)[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b"
)


def tail(run: Run, lines: int = 25) -> str:
    return "\n".join("    | " + line for line in run.lines()[-lines:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the commands and checks")
    parser.add_argument("--only", metavar="TEXT", help="run only commands containing TEXT")
    args = parser.parse_args()
    # Started as a background job of a shell without job control, this process ignores SIGINT,
    # and so would every command it runs: a user's Ctrl-C reaches them with its default action.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    commands = documented_commands()
    commands = [(doc, command) for doc, command in commands if command not in NOT_RUN]
    unknown = [command for _, command in commands if command not in CHECKS]
    if unknown:
        sys.exit(f"check_commands: no check for {unknown[0]!r}: add it to CHECKS")
    dependents = {name for name, spec in CHECKS.items() if spec.inside is not None}
    if args.list:
        for doc, command in commands:
            print(f"{doc}: {command!r}\n    {CHECKS[command]}")
        return
    installs = [VENV_STEP] + [c for _, c in commands if c.startswith("pip install")]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fastlb-commands-") as scratch:
        env = Environment(Path(scratch))
        done: set[str] = set()
        for doc, command in [("README.md", VENV_STEP)] + commands:
            if command in done or command in dependents:
                continue
            if args.only and args.only not in command and command not in installs:
                continue
            done.add(command)
            started = time.monotonic()
            try:
                check(env, command, CHECKS[command])
                verdict = "ok"
            except Failure as failure:
                verdict = f"FAILED: {failure}"
                failed += 1
            spent = time.monotonic() - started
            shown = " ".join(command.split())
            print(f"{spent:6.1f} s  {doc}: {shown}\n          {verdict}", flush=True)
            if command == VENV_STEP and failed:
                break
    if failed:
        sys.exit(f"check_commands: {failed} documented command(s) failed")
    print(f"check_commands: all {len(done)} documented commands work as written")


if __name__ == "__main__":
    main()
