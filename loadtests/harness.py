"""Process plumbing shared by the load-test scripts: free ports, readiness, balancers, cleanup.

Every process is started through :class:`Processes`, which stops each one (and the children it
forked) by PID when the ``with`` block ends, whatever happened inside it. Everything listens on
loopback, on ports picked free at runtime, and readiness is a port that accepts, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _drop_source_tree_from_path() -> None:
    """The scripts measure the installed fastlb: the checkout's fastlb/ has no compiled data
    plane, and on sys.path (as the current directory or the repository root) it would shadow
    the installed package. An in-place build (``pip install -e .``) is a real package: kept."""
    if any((ROOT / "fastlb").glob("_dataplane*.so")):
        return
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]


_drop_source_tree_from_path()  # before any script imports fastlb
# scale.py's bundle unpacks the module elsewhere and names it here.
NGINX_STREAM_MODULE = Path(
    os.environ.get("FASTLB_NGINX_STREAM_MODULE", "/usr/lib/nginx/modules/ngx_stream_module.so")
)
INSTALL_HINT = "apt-get install haproxy libnginx-mod-stream wrk"


def run_script(main: Callable[[], int | None]) -> None:
    """A script's entry point: Ctrl-C ends it with one line and status 130, not a traceback
    (its ``with Processes`` blocks have stopped what it started by then). Ctrl-C also stops
    the script's children, so what fails after it (a child's pipe at EOF) is the interrupt's
    doing, even where Python dropped the KeyboardInterrupt itself (raised in a ``__del__``)."""
    interrupted = False

    def on_interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        code = main()
    except BaseException:
        if not interrupted:
            raise
    if interrupted:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


class HarnessError(Exception):
    """A process did not start or did not become ready; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each stays bound until all are picked, so none repeats."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            held.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def nofile_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@contextlib.contextmanager
def interrupt_held():
    """Holds Ctrl-C off while a child is started and recorded. A child forked just after Ctrl-C
    reached the process group never sees it, so it must be one that its starter stops."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def unblock_interrupt() -> None:
    """``preexec_fn`` of a child started under ``interrupt_held``: it gets Ctrl-C as usual."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class NamedProcess(subprocess.Popen):
    """A child process with a name and a log file that holds its stdout and stderr."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, **kwargs):
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # closed by Processes.stop()
        super().__init__(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=unblock_interrupt,
            **kwargs,
        )


class Processes:
    """Starts processes and stops all of them, by PID, when the ``with`` block ends."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.running: list[NamedProcess] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.running[:]):
            self.stop(proc)

    def start(self, name: str, cmd: list[str], **kwargs) -> NamedProcess:
        with interrupt_held():  # recorded before Ctrl-C can end the caller
            proc = NamedProcess(name, cmd, self.logdir / f"{name}.log", **kwargs)
            self.running.append(proc)
        return proc

    def stop(self, proc: NamedProcess, timeout: float = 10.0) -> None:
        """SIGTERM the process, SIGKILL it after ``timeout``, then kill any child it left behind."""
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in children:
            try:
                child.wait(timeout=2)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.log_file.close()
        if proc in self.running:
            self.running.remove(proc)


def log_tail(proc: NamedProcess, lines: int = 15) -> str:
    try:
        text = Path(proc.log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    port: int, proc: NamedProcess | None = None, timeout: float = 15.0, host: str = LOOPBACK
) -> None:
    """Return once ``host:port`` accepts a connection; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(
                f"{proc.name} exited with status {proc.returncode} before listening on port "
                f"{port}:\n{log_tail(proc)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"nothing accepts on {host}:{port} after {timeout:.0f} s"
                ) from None
            time.sleep(0.02)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time of each live process in ``pids``."""
    times = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        times[pid] = t.user + t.system
    return times


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


# --- balancers -----------------------------------------------------------------------------------


@dataclass
class Running:
    """A started balancer: where clients connect and which processes do its work."""

    name: str
    port: int
    proc: NamedProcess | None = None
    pids: list[int] = field(default_factory=list)

    def refresh_pids(self) -> list[int]:
        if self.proc is not None:
            self.pids = [p.pid for p in process_tree(self.proc.pid)]
        return self.pids


def fastlb_command() -> list[str]:
    # -P: "-m" must not put the current directory first on sys.path; from the repository
    # root that would run the checkout's fastlb/ rather than the installed package.
    return [sys.executable, "-P", "-m", "fastlb"]


def fastlb_missing() -> str | None:
    try:
        done = subprocess.run(
            [*fastlb_command(), "run", "--help"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "`python -m fastlb run --help` did not finish in 30 s"
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or [""])[-1]
        reason = last.split(": ", 1)[-1]
        return f"`python -m fastlb run --help` fails ({reason}); `pip install '.[load]'` in {ROOT}"
    return None


def haproxy_missing() -> str | None:
    return None if shutil.which("haproxy") else f"haproxy is not installed ({INSTALL_HINT})"


def nginx_missing() -> str | None:
    if not shutil.which("nginx"):
        return f"nginx is not installed ({INSTALL_HINT})"
    if not NGINX_STREAM_MODULE.exists():
        return f"nginx's stream module is not installed ({INSTALL_HINT})"
    return None


def wait_for_fastlb_stats(stats_port: int, proc: NamedProcess, timeout: float = 15.0) -> None:
    """Return once fastlb's /stats lists every worker as ready."""
    deadline = time.monotonic() + timeout
    url = f"http://{LOOPBACK}:{stats_port}/stats"
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"fastlb exited with status {proc.returncode}:\n{log_tail(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                stats = json.load(reply)
            workers = stats.get("workers", [])
            if workers and all(w.get("ready") for w in workers):
                return
            last_error = f"workers not ready: {workers}"
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise HarnessError(f"fastlb not ready after {timeout:.0f} s ({last_error}):\n{log_tail(proc)}")


def start_fastlb(
    procs: Processes,
    port: int,
    backends: list[int],
    workers: int,
    max_conn: int | None = None,
    extra_args: Sequence[str] = (),
    log_name: str = "fastlb",
) -> Running:
    stats_port = free_port()
    cmd = [*fastlb_command(), "run", "--listen", f"{LOOPBACK}:{port}"]
    for backend in backends:
        cmd += ["--backend", f"{LOOPBACK}:{backend}"]
    cmd += ["--workers", str(workers), "--stats", f"{LOOPBACK}:{stats_port}"]
    if max_conn is not None:
        cmd += ["--max-conn", str(max_conn)]
    return _run_fastlb(procs, [*cmd, *extra_args], port, stats_port, log_name)


def _run_fastlb(
    procs: Processes, cmd: list[str], port: int, stats_port: int, log_name: str
) -> Running:
    proc = procs.start(log_name, cmd)
    wait_for_fastlb_stats(stats_port, proc)
    wait_for_port(port, proc)
    running = Running("fastlb", port, proc)
    running.refresh_pids()
    return running


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable ASCII is a TOML basic string


def fastlb_sni_config(
    port: int,
    stats_port: int,
    workers: int,
    pools: dict[str, list[int]],
    default_pool: str,
    sni: dict[str, str],
) -> str:
    """A fastlb TOML file: frontend ``tls`` on ``port`` routes by SNI (``{pattern: pool}``) to
    ``pools`` (``{name: backend ports}``), and anything else to ``default_pool``."""
    routes = ", ".join(f"{toml_string(name)} = {toml_string(pool)}" for name, pool in sni.items())
    lines = [
        f"workers = {workers}",
        f"stats = {toml_string(f'{LOOPBACK}:{stats_port}')}",
        "",
        "[frontend.tls]",
        f"listen = [{toml_string(f'{LOOPBACK}:{port}')}]",
        f"pool = {toml_string(default_pool)}",
        f"sni = {{ {routes} }}",
    ]
    for name, ports in pools.items():
        backends = ", ".join(toml_string(f"{LOOPBACK}:{b}") for b in ports)
        lines += ["", f"[pool.{name}]", f"backend = [{backends}]"]
    return "\n".join(lines) + "\n"


def start_fastlb_sni(
    procs: Processes,
    port: int,
    pools: dict[str, list[int]],
    default_pool: str,
    sni: dict[str, str],
    workers: int,
    tmp: Path,
    extra_args: Sequence[str] = (),
) -> Running:
    """fastlb with :func:`fastlb_sni_config` as its ``--config`` file."""
    stats_port = free_port()
    config = tmp / "fastlb-sni.toml"
    config.write_text(fastlb_sni_config(port, stats_port, workers, pools, default_pool, sni))
    cmd = [*fastlb_command(), "run", "--config", str(config), *extra_args]
    return _run_fastlb(procs, cmd, port, stats_port, "fastlb-sni")


# HAProxy 2.6's `option splice-auto` never splices these workloads (perf counts zero splice(2)
# calls), so its zero-copy mode here is splice in both directions, always.
SPLICE_OPTIONS = "    option splice-request\n    option splice-response"


def haproxy_head(
    name: str, threads: int, maxconn: int, tmp: Path, splice: bool = False, cpus: str = ""
) -> str:
    """The ``global`` and ``defaults`` sections every HAProxy here shares; ``cpus`` (0-3) pins
    thread i to the i-th of them."""
    cpu_map = f"    cpu-map auto:1/1-{threads} {cpus}\n" if cpus else ""
    return f"""\
global
    nbthread {threads}
{cpu_map}    maxconn {maxconn}
    pidfile {tmp}/{name}.pid

defaults
    mode tcp
    balance roundrobin
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{SPLICE_OPTIONS if splice else ""}
"""


def haproxy_config(
    port: int,
    backends: list[int],
    threads: int,
    splice: bool,
    maxconn: int,
    tmp: Path,
    accept_proxy: bool = False,
    send_proxy: bool = False,
    name: str = "haproxy",
    cpus: str = "",
) -> str:
    """One frontend to one backend section; ``accept_proxy`` takes a PROXY header (v1 or v2)
    from every client, ``send_proxy`` sends a v2 header first on every server connection;
    ``cpus``: see :func:`haproxy_head`."""
    bind = f"{LOOPBACK}:{port}" + (" accept-proxy" if accept_proxy else "")
    server_options = " send-proxy-v2" if send_proxy else ""
    servers = "\n".join(
        f"    server s{i} {LOOPBACK}:{b}{server_options}" for i, b in enumerate(backends)
    )
    return f"""\
{haproxy_head(name, threads, maxconn, tmp, splice, cpus)}
frontend bench
    bind {bind}
    default_backend servers

backend servers
{servers}
"""


def haproxy_sni_config(
    port: int,
    pools: dict[str, list[int]],
    default_pool: str,
    sni: dict[str, str],
    threads: int,
    maxconn: int,
    tmp: Path,
    name: str = "haproxy",
) -> str:
    """HAProxy's equivalent of :func:`fastlb_sni_config`: one backend section per pool, picked
    from the SNI of the ClientHello; exact names first, then ``*.suffix`` patterns."""
    rules = []
    for pattern, pool in sorted(sni.items(), key=lambda item: item[0].startswith("*.")):
        if pattern.startswith("*."):
            rules.append(f"    use_backend {pool} if {{ req.ssl_sni -m end -i {pattern[1:]} }}")
        else:
            rules.append(f"    use_backend {pool} if {{ req.ssl_sni -i {pattern} }}")
    sections = []
    for pool, ports in pools.items():
        servers = "\n".join(f"    server s{i} {LOOPBACK}:{b}" for i, b in enumerate(ports))
        sections.append(f"backend {pool}\n{servers}\n")
    rule_lines = "\n".join(rules)
    return f"""\
{haproxy_head(name, threads, maxconn, tmp)}
frontend bench
    bind {LOOPBACK}:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
{rule_lines}
    default_backend {default_pool}

{chr(10).join(sections)}"""


def start_haproxy(
    procs: Processes,
    port: int,
    backends: list[int],
    workers: int,
    tmp: Path,
    splice: bool = False,
    maxconn: int = 4096,
    accept_proxy: bool = False,
    send_proxy: bool = False,
    name: str | None = None,
    cpus: str = "",
) -> Running:
    """HAProxy with :func:`haproxy_config`, named haproxy or haproxy-splice; ``name``, by default
    the same, names its log, configuration and PID files; ``cpus``: one per thread."""
    label = "haproxy-splice" if splice else "haproxy"
    name = name or label
    text = haproxy_config(
        port, backends, workers, splice, maxconn, tmp, accept_proxy, send_proxy, name, cpus
    )
    return _run_haproxy(procs, name, port, text, tmp, label)


def start_haproxy_sni(
    procs: Processes,
    port: int,
    pools: dict[str, list[int]],
    default_pool: str,
    sni: dict[str, str],
    workers: int,
    tmp: Path,
    maxconn: int = 4096,
) -> Running:
    text = haproxy_sni_config(port, pools, default_pool, sni, workers, maxconn, tmp, "haproxy-sni")
    return _run_haproxy(procs, "haproxy-sni", port, text, tmp, "haproxy")


def _run_haproxy(
    procs: Processes, name: str, port: int, text: str, tmp: Path, label: str
) -> Running:
    """Start HAProxy as ``name`` (log, configuration file); ``label`` names it in results."""
    config = tmp / f"{name}.cfg"
    config.write_text(text)
    proc = procs.start(name, ["haproxy", "-db", "-f", str(config)])
    wait_for_port(port, proc)
    running = Running(label, port, proc)
    running.refresh_pids()
    return running


def nginx_stream_config(
    port: int,
    backends: list[int],
    workers: int,
    connections: int,
    tmp: Path,
    cpus: Sequence[int] = (),
) -> str:
    """``cpus``: worker i runs on the i-th of them (worker_cpu_affinity, one mask each)."""
    servers = "\n".join(f"        server {LOOPBACK}:{b};" for b in backends)
    affinity = ""
    if cpus:
        masks = " ".join(format(1 << cpus[i % len(cpus)], "b") for i in range(workers))
        affinity = f"worker_cpu_affinity {masks};\n"
    return f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
{affinity}worker_rlimit_nofile {nofile_hard_limit()};
pid {tmp}/nginx-stream.pid;
error_log {tmp}/nginx-stream.error.log warn;

events {{
    worker_connections {connections};
}}

stream {{
    upstream servers {{
{servers}
    }}
    server {{
        listen {LOOPBACK}:{port} reuseport;
        proxy_pass servers;
        proxy_connect_timeout 5s;
        proxy_timeout 120s;
    }}
}}
"""


def start_nginx_stream(
    procs: Processes,
    port: int,
    backends: list[int],
    workers: int,
    tmp: Path,
    connections: int = 8192,
    cpus: Sequence[int] = (),
) -> Running:
    prefix = tmp / "nginx-stream"
    prefix.mkdir(exist_ok=True)
    config = nginx_stream_config(port, backends, workers, connections, prefix, cpus)
    return run_nginx(procs, "nginx-stream", prefix, config, port, workers)


def run_nginx(
    procs: Processes,
    name: str,
    prefix: Path,
    config: str,
    port: int,
    workers: int,
    ready: Callable[[int, NamedProcess], None] = wait_for_port,
) -> Running:
    """Runs nginx in the foreground with ``config`` under ``prefix``; returns once ``ready``
    (by default: the port accepts) and every worker has started."""
    path = prefix / "nginx.conf"
    path.write_text(config)
    cmd = ["nginx", "-p", str(prefix), "-c", str(path), "-e", str(prefix / "error.log")]
    proc = procs.start(name, [*cmd, "-g", "daemon off;"])
    ready(port, proc)
    running = Running("nginx", port, proc)
    # Wait for all workers: the master listens before it forks them.
    deadline = time.monotonic() + 10
    while len(running.refresh_pids()) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return running


# --- versions ------------------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]


def environment() -> dict:
    """Machine and versions, for the record that goes with a result."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        fastlb_version = version("fastlb")
    except Exception:
        fastlb_version = "not installed"
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "fastlb": fastlb_version,
        "git": git.stdout.strip() or "unknown",
        "haproxy": _first_line(["haproxy", "-v"]).split(" - ")[0],
        "nginx": _first_line(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
    }


# --- wrk -----------------------------------------------------------------------------------------

WRK_REPORT = """\
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRK-RESULT {"duration_us": %d, "requests": %d, "bytes": %d, "connect": %d, '
        .. '"read": %d, "write": %d, "status": %d, "timeout": %d, '
        .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
        summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max))
end
"""
# Only a script that defines delay() makes wrk pause before each request (and costs a timer).
WRK_DELAY = """\
local delay_ms = 0
init = function(args) delay_ms = tonumber(args[1]) end
delay = function() return delay_ms end
"""

# wrk connects to the address its URL's host resolves to and sends that host as SNI and Host: this
# resolves any host to loopback, so an https URL with a made-up name needs no /etc/hosts entry.
WRK_LOOPBACK = f"""\
wrk.resolve = function(host, service)
    wrk.addrs = wrk.lookup("{LOOPBACK}", service)
end
"""


@dataclass
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes / self.duration_s / 1e6

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_command(
    url: str,
    duration: int,
    connections: int,
    threads: int,
    script: Path,
    close: bool = False,
    delay_ms: int = 0,
) -> list[str]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s"]
    cmd += ["--timeout", "10s", "-s", str(script)]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(url)
    if delay_ms:
        cmd += ["--", str(delay_ms)]
    return cmd


def write_wrk_script(tmp: Path, delay: bool, loopback: bool = False) -> Path:
    """The wrk script that reports (WRK_REPORT); ``delay`` adds WRK_DELAY, ``loopback``
    WRK_LOOPBACK (the URL's host name is sent, its address is 127.0.0.1)."""
    name = "wrk-delay" if delay else "wrk-report"
    name += "-loopback" if loopback else ""
    path = tmp / f"{name}.lua"
    path.write_text((WRK_DELAY if delay else "") + (WRK_LOOPBACK if loopback else "") + WRK_REPORT)
    return path


def run_wrk(cmd: list[str], timeout: float) -> WrkResult:
    """Runs wrk to the end. A Ctrl-C that comes while wrk starts would otherwise interrupt the
    start after the fork, before anything holds the process to kill it (and a wrk forked just
    after the signal never got it): SIGINT waits while wrk starts, wrk runs with it blocked, and
    whatever interrupts the rest kills wrk. The mask is restored inside the try, as a Ctrl-C
    held meanwhile is raised the moment it is."""
    wrk = None
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        stdout, stderr = wrk.communicate(timeout=timeout)
    except BaseException:
        if wrk is not None:
            wrk.kill()
            wrk.wait()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return wrk_result(subprocess.CompletedProcess(cmd, wrk.returncode, stdout, stderr), cmd)


def wrk_result(done: subprocess.CompletedProcess, cmd: list[str]) -> WrkResult:
    """The result line that WRK_REPORT makes wrk print, parsed."""
    for line in done.stdout.splitlines():
        if line.startswith("WRK-RESULT "):
            r = json.loads(line.removeprefix("WRK-RESULT "))
            return WrkResult(
                requests=r["requests"],
                bytes=r["bytes"],
                duration_s=r["duration_us"] / 1e6,
                errors={k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]},
                p50_ms=r["p50_us"] / 1e3,
                p90_ms=r["p90_us"] / 1e3,
                p99_ms=r["p99_us"] / 1e3,
                max_ms=r["max_us"] / 1e3,
            )
    raise HarnessError(
        f"wrk gave no result (status {done.returncode}): {shlex.join(cmd)}\n"
        f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
