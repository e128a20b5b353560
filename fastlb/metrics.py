"""Statistics over HTTP, served from the supervisor's own selectors loop.

``GET /`` answers the status page, ``fastlb/web/status.html``: one self-contained HTML file
whose script polls ``/stats`` every second and computes the rates between two polls.

``GET /stats`` answers the supervisor's snapshot as JSON::

    {"pid": <supervisor pid>, "version": <fastlb version>, "table_version": <int>,
     "access_log_dropped": <int>, "worker_restarts": <int>,
     "count_staleness_ms": {"bounds": [<ms>, ...], "counts": [<counts applied that late>, ...]},
     "reloads": {"applied": <int>, "failed": <int>},
     "workers": [{"id": <int>, "pid": <int>, "ready": <bool>, "cpu_seconds": <float>,
                  "rss_bytes": <int>, "open_fds": <int>, "cpus": [<CPUs it may run on>],
                  "coalesced_waits": <times its loop slept --coalesce-us>}, ...],
     "frontends": [{"name": <str>, "listen": ["host:port", ...], "pool": <default pool>,
                    "sni": {<pattern>: <pool>}, "accept_proxy": [<network>, ...],
                    "active": <open connections>, "connections": <accepted>,
                    "rejected": <closed before a pick>,
                    "gave_up": <closed because every backend tried failed>,
                    "protocol": "tcp" | "udp", (udp: "active" counts flows, and)
                    "udp": {"created": <flows>, "evicted": <flows>, "datagrams_in": <int>,
                            "bytes_in": <client -> backend>, "datagrams_out": <int>,
                            "bytes_out": <int>, "dropped": {<reason>: <int>}}}, ...],
     "pools": [{"name": <str>, "algorithm": <str>, "send_proxy": "v1" | "v2" | null,
                "check": <active check type> | null, "panic": <bool>,
                "backends": [<backend id>, ...]}, ...],
     "backends": [{"id": <int>, "pool": <pool name>, "address": "host:port",
                   "weight": <int>, "effective_weight": <as the workers use it>,
                   "backup": <bool>, "up": <bool>,
                   "active": <open connections, all workers>, "connections": <total new>,
                   "failed": <failed connects>, "up_bytes": <client -> backend>,
                   "down_bytes": <backend -> client>, "transitions": <changes of state>,
                   "history": {"state": "up" | "down" | "drain" | "maint", "since": <time>,
                               "last_check": null | {"ok", "reason", "duration", "at"},
                               "transitions": [{"at", "from", "to", "reason"}, ...]}}, ...]}

``GET /metrics`` answers the same numbers in the Prometheus text format, through a
prometheus_client collector over the snapshot on a registry of its own.

The server never blocks the loop: non-blocking sockets, one HTTP/1.0 request per connection,
closed after the response.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fastlb.protocol.messages import CONNECT_BOUNDS_MS, DURATION_BOUNDS_MS
from fastlb.supervisor.listeners import accept_waiting

log = logging.getLogger("fastlb.stats")

MAX_REQUEST = 8192  # bytes of request head; larger requests are answered as they are
CLIENT_TIMEOUT = 5.0  # a client gets this long to ask and read the answer
MAX_CLIENTS = 128

Snapshot = Callable[[], dict]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class StatsCollector(Collector):
    """Prometheus metrics from the supervisor's snapshot, computed at each scrape."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()
        workers = stats["workers"]
        yield GaugeMetricFamily("fastlb_workers", "Worker processes running.", len(workers))
        yield GaugeMetricFamily(
            "fastlb_workers_ready",
            "Worker processes accepting connections.",
            sum(1 for worker in workers if worker["ready"]),
        )
        yield InfoMetricFamily(
            "fastlb_build", "The fastlb version running.", {"version": stats["version"]}
        )
        yield CounterMetricFamily(
            "fastlb_worker_restarts",
            "Workers that died and were replaced (drained ones are not counted).",
            stats["worker_restarts"],
        )
        reloads = CounterMetricFamily(
            "fastlb_reloads", "Reloads (SIGHUP) by result.", labels=["result"]
        )
        for result, count in stats["reloads"].items():
            reloads.add_metric([result], count)
        yield reloads
        usage = {
            "cpu_seconds": CounterMetricFamily(
                "fastlb_worker_cpu_seconds",
                "CPU time of a worker, user and system.",
                labels=["worker"],
            ),
            "rss_bytes": GaugeMetricFamily(
                "fastlb_worker_resident_memory_bytes",
                "Resident memory of a worker.",
                labels=["worker"],
            ),
            "open_fds": GaugeMetricFamily(
                "fastlb_worker_open_fds", "Open file descriptors of a worker.", labels=["worker"]
            ),
        }
        for worker in workers:
            for key, family in usage.items():
                if worker.get(key) is not None:
                    family.add_metric([str(worker["id"])], float(worker[key]))
        yield from usage.values()
        coalesced = CounterMetricFamily(
            "fastlb_worker_coalesced_waits",
            "Times a worker's loop, churning through new connections, slept --coalesce-us on a "
            "timer instead of blocking.",
            labels=["worker"],
        )
        for worker in workers:
            coalesced.add_metric([str(worker["id"])], worker["coalesced_waits"])
        yield coalesced
        yield GaugeMetricFamily(
            "fastlb_table_version",
            "Version of the backend table sent to the workers; it grows at every up/down change.",
            stats["table_version"],
        )
        frontend_families = {
            "active": GaugeMetricFamily(
                "fastlb_frontend_active_connections", "Open connections.", labels=["frontend"]
            ),
            "connections": CounterMetricFamily(
                "fastlb_frontend_connections", "Connections accepted.", labels=["frontend"]
            ),
            "gave_up": CounterMetricFamily(
                "fastlb_frontend_gave_up",
                "Clients closed because every backend they tried failed.",
                labels=["frontend"],
            ),
            "rejected": CounterMetricFamily(
                "fastlb_frontend_rejected",
                "Connections closed before a pick: no valid PROXY header from a trusted sender, "
                "or no SNI route with sni-required.",
                labels=["frontend"],
            ),
        }
        for frontend in stats["frontends"]:
            for key, family in frontend_families.items():
                family.add_metric([frontend["name"]], float(frontend[key]))
        yield from frontend_families.values()
        ended = CounterMetricFamily(
            "fastlb_frontend_ended",
            "Connections that ended, by why (as the access log says it).",
            labels=["frontend", "reason"],
        )
        for frontend in stats["frontends"]:
            for reason, count in frontend["ended"].items():
                ended.add_metric([frontend["name"], reason], count)
        yield ended
        yield from _udp_families(stats["frontends"])
        yield CounterMetricFamily(
            "fastlb_access_log_dropped",
            "Access log records lost because the writer fell behind.",
            stats["access_log_dropped"],
        )
        label = ["pool", "backend"]
        families = {
            "up": GaugeMetricFamily("fastlb_backend_up", "1 if the backend is up.", labels=label),
            "weight": GaugeMetricFamily("fastlb_backend_weight", "Weight.", labels=label),
            "backup": GaugeMetricFamily(
                "fastlb_backend_backup", "1 for a backup backend.", labels=label
            ),
            "active": GaugeMetricFamily(
                "fastlb_backend_active_connections", "Open connections.", labels=label
            ),
            "connections": CounterMetricFamily(
                "fastlb_backend_connections", "Connections established.", labels=label
            ),
            "failed": CounterMetricFamily(
                "fastlb_backend_connect_failures", "Connects that failed.", labels=label
            ),
        }
        transferred = CounterMetricFamily(
            "fastlb_backend_bytes",
            "Bytes forwarded: direction up is client to backend, down backend to client.",
            labels=["pool", "backend", "direction"],
        )
        for backend in stats["backends"]:
            labels = [backend["pool"], backend["address"]]
            for key, family in families.items():
                family.add_metric(labels, float(backend[key]))
            transferred.add_metric([*labels, "up"], backend["up_bytes"])
            transferred.add_metric([*labels, "down"], backend["down_bytes"])
        yield from families.values()
        yield transferred
        check_ok = GaugeMetricFamily(
            "fastlb_backend_check_status",
            "1 if the last health check passed, 0 if not.",
            labels=label,
        )
        check_duration = GaugeMetricFamily(
            "fastlb_backend_check_duration_seconds",
            "How long the last health check took.",
            labels=label,
        )
        transitions = CounterMetricFamily(
            "fastlb_backend_transitions",
            "Changes of state (up, down, drain, maint) since start.",
            labels=label,
        )
        for backend in stats["backends"]:
            labels = [backend["pool"], backend["address"]]
            transitions.add_metric(labels, backend["transitions"])
            last = backend["history"]["last_check"]
            if last is not None:
                check_ok.add_metric(labels, 1.0 if last["ok"] else 0.0)
                check_duration.add_metric(labels, last["duration"])
        yield check_ok
        yield check_duration
        yield transitions
        histograms = {
            "connect_ms": (
                HistogramMetricFamily(
                    "fastlb_backend_connect_seconds",
                    "Time from the start of a connect to the backend to its completion.",
                    labels=label,
                ),
                CONNECT_BOUNDS_MS,
            ),
            "duration_ms": (
                HistogramMetricFamily(
                    "fastlb_backend_connection_duration_seconds",
                    "Time from accepting a client to closing its connection.",
                    labels=label,
                ),
                DURATION_BOUNDS_MS,
            ),
        }
        for backend in stats["backends"]:
            labels = [backend["pool"], backend["address"]]
            for key, (family, bounds) in histograms.items():
                counts, total = backend[key]["counts"], 0
                buckets = []
                for bound, count in zip([*bounds, None], counts, strict=False):
                    total += count
                    buckets.append(("+Inf" if bound is None else repr(bound / 1000), total))
                family.add_metric(labels, buckets, backend[key]["sum"] / 1000)
        for family, _ in histograms.values():
            yield family


@dataclass
class _Client:
    handler: Callable[[int], None]
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    response: memoryview | None = None  # what is left to send, once answered
    eof: bool = False


class StatsServer:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, snapshot: Snapshot):
        self.sock = sock
        self.selector = selector
        self.snapshot = snapshot
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot))
        self.clients: dict[socket.socket, _Client] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, lambda mask: self._accept())

    # ---- requests and responses

    def respond(self, request: bytes) -> bytes:
        """The whole HTTP response to one request head."""
        parts = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) < 2:
            return _http(400, "text/plain", b"bad request\n")
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _http(405, "text/plain", b"only GET and HEAD\n")
        if path == "/":
            body = status_page()
            response = _http(200, "text/html; charset=utf-8", body, head=method == "HEAD")
        elif path == "/stats":
            body = json.dumps(self.snapshot()).encode() + b"\n"
            response = _http(200, "application/json", body, head=method == "HEAD")
        elif path == "/metrics":
            body = generate_latest(self.registry)
            response = _http(200, CONTENT_TYPE_LATEST, body, head=method == "HEAD")
        else:
            response = _http(404, "text/plain", b"not found; try /, /stats or /metrics\n")
        return response

    # ---- I/O, driven by the selector

    def owns(self, fileobj) -> bool:
        """Whether a selector key belongs to the stats server."""
        return fileobj is self.sock or fileobj in self.clients

    def _accept(self) -> None:
        for conn in accept_waiting(self.sock, 64, lambda: len(self.clients) < MAX_CLIENTS, "stats"):
            client = _Client(
                handler=lambda mask, conn=conn: self._on_event(conn, mask),
                deadline=time.monotonic() + CLIENT_TIMEOUT,
            )
            self.clients[conn] = client
            self.selector.register(conn, selectors.EVENT_READ, client.handler)

    def _on_event(self, conn: socket.socket, mask: int) -> None:
        client = self.clients.get(conn)
        if client is not None and mask & selectors.EVENT_READ:
            self._read(conn, client)
        client = self.clients.get(conn)
        if client is not None and client.response and mask & selectors.EVENT_WRITE:
            self._write(conn, client)

    def _read(self, conn: socket.socket, client: _Client) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            client.eof = True
            if client.response is None and client.request:
                self._answer(conn, client)  # the client closed its side after asking
            elif not client.response:
                self._close(conn)
            return
        if client.response is not None:
            return  # answered: discard anything more until the client closes
        client.request += data
        head_done = b"\r\n\r\n" in client.request or b"\n\n" in client.request
        if head_done or len(client.request) > MAX_REQUEST:
            self._answer(conn, client)

    def _answer(self, conn: socket.socket, client: _Client) -> None:
        client.response = memoryview(self.respond(bytes(client.request)))
        self._write(conn, client)

    def _write(self, conn: socket.socket, client: _Client) -> None:
        try:
            sent = conn.send(client.response)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        client.response = client.response[sent:]
        if client.response:
            self.selector.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, client.handler)
            return
        if client.eof:
            self._close(conn)
            return
        # Wait for the client to close first: closing with its bytes unread would send a reset
        # that can destroy the response before it is read.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self.selector.modify(conn, selectors.EVENT_READ, client.handler)

    def expire(self, now: float) -> None:
        for conn, client in list(self.clients.items()):
            if now >= client.deadline:
                self._close(conn)

    def next_deadline(self) -> float | None:
        return min((client.deadline for client in self.clients.values()), default=None)

    def _close(self, conn: socket.socket) -> None:
        del self.clients[conn]
        self.selector.unregister(conn)
        conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._close(conn)
        self.selector.unregister(self.sock)
        self.sock.close()

    def close_after_fork(self) -> None:
        """In a forked worker: closes the sockets, leaving the shared selector alone."""
        for conn in self.clients:
            conn.close()
        self.clients.clear()
        self.sock.close()


_UDP_FAMILIES = {
    "created": ("fastlb_udp_flows_created", "UDP flows opened."),
    "evicted": ("fastlb_udp_flows_evicted", "UDP flows ended to make room (max-flows)."),
    "datagrams_in": ("fastlb_udp_datagrams_in", "Datagrams from clients."),
    "bytes_in": ("fastlb_udp_bytes_in", "Bytes of datagrams from clients."),
    "datagrams_out": ("fastlb_udp_datagrams_out", "Datagrams from backends to clients."),
    "bytes_out": ("fastlb_udp_bytes_out", "Bytes of datagrams from backends to clients."),
}


def _udp_families(frontends: list[dict]) -> Iterator[Metric]:
    """The traffic of the UDP frontends: flows, datagrams and bytes each way, drops."""
    families = {
        key: CounterMetricFamily(name, text, labels=["frontend"])
        for key, (name, text) in _UDP_FAMILIES.items()
    }
    dropped = CounterMetricFamily(
        "fastlb_udp_dropped", "Datagrams not forwarded, by why.", labels=["frontend", "reason"]
    )
    for frontend in frontends:
        udp = frontend.get("udp")
        if udp is None:
            continue
        for key, family in families.items():
            family.add_metric([frontend["name"]], udp[key])
        for reason, count in udp["dropped"].items():
            dropped.add_metric([frontend["name"], reason], count)
    yield from families.values()
    yield dropped


@functools.cache
def status_page() -> bytes:
    """The status page, as installed with the package."""
    return importlib.resources.files("fastlb.web").joinpath("status.html").read_bytes()


def _http(status: int, content_type: str, body: bytes, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.0 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)
