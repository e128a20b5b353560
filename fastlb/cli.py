"""The ``fastlb`` command: ``run``, ``check``, ``demo``, ``status`` and ``ctl``.

The flags of ``run`` and ``check`` come from the table in :mod:`fastlb.settings`. Every user
error ends as one line on stderr, ``fastlb: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import signal
import socket
import sys
import textwrap

import fastlb.config
from fastlb import __version__, demo, settings
from fastlb.control.commands import VERBS, Runtime, config_pools, unusable_pools
from fastlb.control.server import bind_control_socket, load_state
from fastlb.errors import EXIT_UNREACHABLE, EXIT_USAGE, ConfigError, FastlbError
from fastlb.model import Config
from fastlb.supervisor.arbiter import Arbiter
from fastlb.supervisor.listeners import open_listener
from fastlb.supervisor.sockets import Sockets

log = logging.getLogger("fastlb")

LOG_FORMAT = "%(asctime)s fastlb[%(process)d]: %(levelname)s %(message)s"
# journald stamps every line itself: a time of our own would show twice.
JOURNAL_FORMAT = "fastlb[%(process)d]: %(levelname)s %(message)s"
WATCH_WIDTH = 160  # a watch piped to a file: room for the rate columns too
DEMO_DRAIN_TIMEOUT = "2"  # a browser's keep-alive connection should not hold Ctrl-C for long
DEFAULT_CONTROL = "/run/fastlb/control.sock"  # where the shipped systemd unit puts it


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USAGE, f"fastlb: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="fastlb",
        description="A fast L4 (TCP and UDP) load balancer: a supervisor and SO_REUSEPORT workers "
        "running a Cython epoll data plane.",
        epilog=_flags_summary(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastlb {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    run = commands.add_parser(
        "run",
        help="run the load balancer",
        description="Balance TCP connections on --listen over the --backend servers until "
        "SIGTERM or SIGINT, which drain open connections first (a second one stops at once).",
    )
    settings.add_arguments(run)
    run.set_defaults(handler=run_command)

    check = commands.add_parser(
        "check",
        help="validate the flags and --config file of run and print the resolved settings",
        description="Validate the flags and the --config file of 'fastlb run' (resolving host "
        "names), print the settings of the process, of every frontend and of every pool, one "
        "per line, try to bind every listen address and the stats address, and try a TCP "
        "connect to every backend; exit status 2 on an error or an address that cannot be "
        "bound (in use, or a privileged port), else 4 when a backend does not accept.",
    )
    settings.add_arguments(check)
    check.set_defaults(handler=check_command)

    demo_parser = commands.add_parser(
        "demo",
        help="try fastlb in front of three local HTTP backends",
        description="Start three small HTTP backends on loopback and fastlb in front of them, "
        "print how to try it, and run until Ctrl-C.",
    )
    demo_parser.add_argument(
        "--listen", default="127.0.0.1:8000", metavar="HOST:PORT", help="[default: %(default)s]"
    )
    demo_parser.add_argument(
        "--workers", metavar="N", help="worker processes [default: number of CPUs]"
    )
    demo_parser.set_defaults(handler=demo_command)

    status_parser = commands.add_parser(
        "status",
        help="show a running balancer's backends (from its --stats address)",
        description="Read GET /stats from a running fastlb (its --stats address) and print its "
        "frontends and backends as tables; with --watch, again every --interval, with rates.",
    )
    status_parser.add_argument("stats", metavar="HOST:PORT", help="the balancer's --stats address")
    status_parser.add_argument(
        "--watch",
        action="store_true",
        help="refresh like top, with connections and bytes per second, until Ctrl-C",
    )
    status_parser.add_argument(
        "--interval", metavar="S", help="seconds between two refreshes of --watch [default: 1]"
    )
    status_parser.set_defaults(handler=status_command)

    for name, handler, text in (
        (
            "reload",
            reload_command,
            "re-read a running supervisor's --config file: validated here first (a mistake is "
            "one FILE:LINE line and exit status 2, and nothing is signalled), then SIGHUP: a new "
            "generation of workers starts with the new settings and the old one drains",
        ),
        (
            "upgrade",
            upgrade_command,
            "make a running supervisor execute the installed fastlb in its place (SIGUSR2), "
            "handing over its listening sockets; its workers serve until the new ones accept, "
            "then drain. The --config file is validated here first",
        ),
    ):
        sub = commands.add_parser(name, help=text.split(":")[0], description=text)
        sub.add_argument("--pid", metavar="PID", help="the supervisor's pid [default: $MAINPID]")
        sub.add_argument("--pid-file", metavar="FILE", help="a file holding the supervisor's pid")
        sub.set_defaults(handler=handler)
    ctl_parser = commands.add_parser(
        "ctl",
        help="change a running balancer: drain, disable, weight, add or remove a backend",
        description="Send one command to a running fastlb over its --control socket and print "
        "the answer; exit status 2 when it refuses the command, 4 when it cannot be reached.",
        epilog="verbs:\n"
        + "\n".join(f"  {f'{verb} {args}':<40} {what}" for verb, (args, what) in VERBS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl_parser.add_argument(
        "--control",
        metavar="PATH",
        default=DEFAULT_CONTROL,
        help="the balancer's control socket [default: %(default)s]",
    )
    ctl_parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    ctl_parser.add_argument("verb", metavar="VERB", help="one of: " + ", ".join(VERBS))
    ctl_parser.add_argument("args", metavar="ARG", nargs="*", help="the verb's arguments")
    ctl_parser.set_defaults(handler=ctl_command)
    return parser


def _flags_summary() -> str:
    lines = ["run and check take these flags (details: fastlb run --help):"]
    for option in settings.OPTIONS:
        if not option.command_line:
            continue
        name = f"{option.flag} {option.metavar}" if option.metavar else option.flag
        first = option.help.split(";")[0]
        lines += textwrap.wrap(
            f"{name:<26} {first}", width=100, initial_indent="  ", subsequent_indent=" " * 29
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: run, check, demo, status, reload, upgrade or ctl")
    try:
        return args.handler(args)
    except FastlbError as exc:
        print(f"fastlb: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130  # before the supervisor took over the signals: nothing to clean up


# ---- commands ------------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> Config:
    return fastlb.config.load(vars(args), args.config)


def check_access_log(config: Config) -> None:
    """A one-line error now rather than workers that cannot start."""
    if config.access_log and config.access_log != "-":
        try:
            os.close(os.open(config.access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise ConfigError(f"--access-log {config.access_log}: {exc.strerror}") from None


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args)
    check_access_log(config)
    # Sockets from systemd (socket activation) or from the fastlb we replace (an upgrade).
    sockets = Sockets.inherit()
    config, stats_socket = open_sockets(config, sockets)
    for address in sockets.retire_unused(config):
        log.warning("inherited socket on %s: no frontend listens there; closing it", address)
    try:
        control_socket = bind_control_socket(config.control) if config.control else None
    except FastlbError:
        sockets.close()
        if stats_socket:
            stats_socket.close()
        raise
    setup_logging(config.log_level)
    limit = raise_open_file_limit()
    config = fit_max_conn(config, limit, warn=args.max_conn is not None)

    def reload() -> Config:
        return fastlb.config.fit_to_open_file_limit(load_config(args), limit)[0]

    return Arbiter(
        config,
        sockets,
        stats_socket,
        reload=reload if args.config else None,
        control_socket=control_socket,
    ).run()


def check_command(args: argparse.Namespace) -> int:
    config = fastlb.config.load(vars(args), args.config)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config, message = fastlb.config.fit_to_open_file_limit(config, _usable_limit(hard))
    for line in fastlb.config.describe(config):
        print(line)
    if message:
        print(f"fastlb: note: {message}", file=sys.stderr)
    runtime, state_warning = (
        load_state(config.state_file) if config.state_file else (Runtime(), None)
    )
    if state_warning:
        print(f"fastlb: warning: {state_warning}", file=sys.stderr)
    runtime.reconcile(config, starting=True)
    for problem in unusable_pools(config_pools(config, runtime)).values():
        print(f"fastlb: warning: {problem}", file=sys.stderr)
    unbound = 0
    addresses = [
        (f"frontend {f.name}", address, f.protocol == "udp")
        for f in config.frontends
        for address in f.listen
    ]
    if config.stats:
        addresses.append(("stats", config.stats, False))
    for owner, address, udp in addresses:
        problem = bind_problem(address, udp)
        if problem:
            print(f"fastlb: error: {owner} cannot listen on {address}: {problem}", file=sys.stderr)
            unbound += 1
    unreachable = 0
    for pool in config.pools:
        if pool.protocol == "udp":
            continue  # no connect tells whether a UDP server listens; its checks do
        for backend in pool.backends:
            problem = probe(backend, pool.check.timeout)
            if problem:
                print(f"fastlb: error: pool {pool.name} backend {backend.address} is "
                      f"unreachable: {problem}", file=sys.stderr)  # fmt: skip
                unreachable += 1
    if unbound:
        return EXIT_USAGE
    return EXIT_UNREACHABLE if unreachable else 0


def bind_problem(address: settings.Address, udp: bool = False) -> str | None:
    """Why ``fastlb run`` could not listen on ``address`` (over UDP with ``udp``) now, or None.
    Binds as its listeners do (SO_REUSEADDR, IPv6 only for IPv6) and closes at once."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        with socket.socket(settings.address_family(address), kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        lowest = _unprivileged_port_start()
        if isinstance(exc, PermissionError) and address.port < lowest:
            return f"{reason} (a port below {lowest} needs root or CAP_NET_BIND_SERVICE)"
        return reason
    return None


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def probe(backend: settings.Backend, timeout: float) -> str | None:
    """Why a TCP connect to the backend fails, or None when it is accepted."""
    address = backend.address
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)


def supervisor_pid(args: argparse.Namespace) -> int:
    """The pid from --pid, --pid-file or $MAINPID (set by systemd for ExecReload=)."""
    if args.pid is not None:
        text, where = args.pid, "--pid"
    elif args.pid_file is not None:
        try:
            with open(args.pid_file) as f:
                text, where = f.read().strip(), args.pid_file
        except OSError as exc:
            raise ConfigError(f"--pid-file {args.pid_file}: {exc.strerror}") from None
    elif os.environ.get("MAINPID"):
        text, where = os.environ["MAINPID"], "$MAINPID"
    else:
        raise ConfigError("which supervisor? give --pid or --pid-file (systemd sets $MAINPID)")
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{where}: not a pid: {text!r}")
    return int(text)


def validate_running(pid: int) -> None:
    """Loads the config as the supervisor ``pid`` will on a reload: its own command line, its
    working directory. Raises ConfigError (FILE:LINE for a mistake in the file)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [part.decode() for part in f.read().split(b"\0")[:-1]]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        raise ConfigError(f"no process {pid}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read process {pid}: {exc.strerror}") from None
    if "run" not in argv:
        raise ConfigError(f"process {pid} is not a fastlb run supervisor")
    parser = Parser(prog="fastlb run")
    settings.add_arguments(parser)
    values, _ = parser.parse_known_args(argv[argv.index("run") + 1 :])
    if not values.config:
        raise ConfigError(f"fastlb (pid {pid}) runs without --config: nothing to reload")
    values.config = os.path.join(cwd, values.config)
    fastlb.config.load(vars(values), values.config)


def signal_supervisor(args: argparse.Namespace, signum: int, what: str) -> int:
    pid = supervisor_pid(args)
    validate_running(pid)
    try:
        os.kill(pid, signum)
    except OSError as exc:
        raise ConfigError(f"cannot signal pid {pid}: {exc.strerror}") from None
    print(f"fastlb: {what} asked of pid {pid}; it logs the outcome", file=sys.stderr)
    return 0


def reload_command(args: argparse.Namespace) -> int:
    return signal_supervisor(args, signal.SIGHUP, "reload")


def upgrade_command(args: argparse.Namespace) -> int:
    return signal_supervisor(args, signal.SIGUSR2, "upgrade")


def status_command(args: argparse.Namespace) -> int:
    from fastlb import status  # rich is only needed here

    address = settings.OPTIONS_BY_NAME["stats"].value(args.stats)
    if args.interval is not None and not args.watch:
        raise ConfigError("--interval is for --watch")
    if not args.watch:
        status.render(status.fetch(address), status.console())
        return 0
    try:
        interval = settings.seconds(positive=True)(args.interval or "1")
    except ValueError as exc:
        raise ConfigError(f"--interval {args.interval}: {exc}") from None
    try:
        status.watch(address, interval, status.console(width=WATCH_WIDTH))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    return 0


def ctl_command(args: argparse.Namespace) -> int:
    from fastlb.control import client

    reply = client.request(args.control, args.verb, args.args)
    if args.json:
        print(json.dumps(reply, indent=1))
    else:
        sys.stdout.write(client.render(reply))
    for warning in reply.get("warnings", ()):
        print(f"fastlb: warning: {warning}", file=sys.stderr)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    backends = demo.bind_backends(3)
    try:
        config = fastlb.config.load(
            {
                "listen": [args.listen],
                "workers": args.workers,
                "backends": [str(backend.address) for backend in backends],
                "algorithm": "roundrobin",
                "stats": "127.0.0.1:0",
                "drain_timeout": DEMO_DRAIN_TIMEOUT,
            },
            None,
        )
        sockets = Sockets()
        config, stats_socket = open_sockets(config, sockets)
        setup_logging(config.log_level)
        config = fit_max_conn(config, raise_open_file_limit(), warn=False)
        stats_host, stats_port = stats_socket.getsockname()[:2]
        text = demo.instructions(
            f"http://{args.listen}/", f"http://{stats_host}:{stats_port}/stats", config.workers
        )
        demo.start_backends(backends)
        arbiter = Arbiter(config, sockets, stats_socket, on_ready=lambda: _print_now(text))
        return arbiter.run()
    finally:
        demo.stop_backends(backends)


# ---- helpers -------------------------------------------------------------------------------------


class IsoTimeFormatter(logging.Formatter):
    """Times as ISO 8601 in local time with its offset: 2026-12-02T03:04:05.123+01:00."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")


def setup_logging(level: str) -> None:
    """Logs to stderr, one line per event; set up before forking so that workers inherit it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(JOURNAL_FORMAT) if stderr_is_journal() else IsoTimeFormatter(LOG_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: systemd sets JOURNAL_STREAM to its
    DEVICE:INODE, which a redirection elsewhere (fastlb run 2>file) no longer matches."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _usable_limit(hard: int) -> int:
    # An unlimited hard limit still stops at fs.nr_open.
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_file_limit() -> int:
    """Raises the soft limit on open files to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _usable_limit(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return _usable_limit(soft)


def fit_max_conn(config: Config, limit: int, warn: bool) -> Config:
    config, message = fastlb.config.fit_to_open_file_limit(config, limit)
    if message:
        # Lowering the default is routine; lowering what the user asked for deserves a warning.
        log.log(logging.WARNING if warn else logging.INFO, "%s", message)
    return config


def open_sockets(config: Config, sockets: Sockets) -> tuple[Config, socket.socket | None]:
    """Binds the frontends' listening sockets into ``sockets`` (what it lacks) and the stats
    server's; returns the config with port 0 replaced by the ports bound, and the stats socket.
    ConfigError when one cannot be bound."""
    try:
        config = sockets.prepare(config)
        stats_socket = open_listener(config.stats) if config.stats else None
    except FastlbError:
        sockets.close()
        raise
    return config, stats_socket


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
