"""UDP frontends against real peers: unbound and nsd behind fastlb (dig, dnsperf), syslog lines
from ``logger --udp``, 64 KiB datagrams, and a backend that stops."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import CLIENT_TIMEOUT, START_TIMEOUT, free_ports, ipv6_loopback, wait_until
from peers import DNS_ZONE, NSD_ANSWER, UNBOUND_ANSWER, dig, require


def udp_config(
    port: int, stats: int, backends: list[str], pool: str = "", frontend: str = "", idle: float = 1
):
    """A file with one UDP frontend on 127.0.0.1:``port`` and its pool, plus extra keys. Flows
    idle out after ``idle`` seconds: a balancer that stops waits for them."""
    listed = ", ".join(f'"{b}"' for b in backends)
    return (
        f'stats = "127.0.0.1:{stats}"\n'
        "[frontend.udp]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        'protocol = "udp"\n'
        'pool = "servers"\n' + frontend + "[pool.servers]\n"
        f"backend = [{listed}]\n"
        f"udp-idle-timeout = {idle}\n" + pool
    )


def udp_stats(lb, stats: dict | None = None) -> dict:
    return lb.frontend_stats("udp", stats)


def test_dig_answers_through_fastlb_from_both_servers(configured, peers):
    unbound, nsd = peers.unbound(), peers.nsd()
    port, stats = free_ports(2)
    lb = configured(
        udp_config(port, stats, [unbound.address, nsd.address], pool="udp-responses = 1\n")
    )
    answers = [dig(port) for _ in range(6)]
    assert sorted(answers) == [[UNBOUND_ANSWER]] * 3 + [[NSD_ANSWER]] * 3, answers
    # Each query was a flow of its own that ended with its answer.
    final = lb.wait_for(
        lambda s: udp_stats(lb, s)["udp"]["datagrams_out"] == 6, what="6 answers counted"
    )
    udp = udp_stats(lb, final)
    assert udp["udp"]["created"] == 6 and udp["udp"]["datagrams_in"] == 6
    assert udp["active"] == 0 and not any(udp["udp"]["dropped"].values())
    assert udp["udp"]["bytes_in"] > 0 and udp["udp"]["bytes_out"] > udp["udp"]["bytes_in"]
    assert [lb.backend(b.address, final)["connections"] for b in (unbound, nsd)] == [3, 3]


def test_dnsperf_loses_no_query_at_a_paced_rate(configured, peers, tmp_path):
    program = require("dnsperf", "dnsperf")
    unbound, nsd = peers.unbound(), peers.nsd()
    port, stats = free_ports(2)
    lb = configured(
        udp_config(port, stats, [unbound.address, nsd.address], pool="udp-responses = 1\n"),
        workers=2,
    )
    queries = tmp_path / "queries"
    queries.write_text(f"who.{DNS_ZONE} A\n{DNS_ZONE} A\n" * 50)
    done = subprocess.run(
        [program, "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", "2"]
        + ["-Q", "500", "-c", "4", "-t", "2"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + 10,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sent = int(re.search(r"Queries sent:\s+(\d+)", done.stdout).group(1))
    completed = int(re.search(r"Queries completed:\s+(\d+)", done.stdout).group(1))
    assert sent >= 500 and completed == sent, done.stdout
    final = lb.wait_for(lambda s: udp_stats(lb, s)["udp"]["datagrams_out"] == sent)
    assert udp_stats(lb, final)["udp"]["datagrams_in"] == sent


def test_logger_lines_reach_a_syslog_receiver(configured):
    program = require("logger", "bsdutils")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(CLIENT_TIMEOUT)
        port, stats = free_ports(2)
        backend = f"127.0.0.1:{receiver.getsockname()[1]}"
        lb = configured(udp_config(port, stats, [backend], idle=0.5))
        lines = [f"fastlb test line {i}" for i in range(5)]
        for line in lines:
            subprocess.run(
                [program, "--udp", "-n", "127.0.0.1", "-P", str(port), "-t", "udptest", line],
                check=True,
                timeout=START_TIMEOUT,
            )
        received = [receiver.recv(65536).decode() for _ in lines]
    for line, message in zip(lines, received, strict=True):
        assert message.startswith("<") and message.endswith(line) and "udptest" in message
    # Syslog is one-way: each logger run is a flow, until it idles out.
    lb.wait_for(lambda s: udp_stats(lb, s)["udp"]["created"] == len(lines))
    lb.wait_for(lambda s: udp_stats(lb, s)["active"] == 0, what="flows to idle out")


@pytest.mark.parametrize("size", [1, 1472, 9000, 65507])
def test_datagrams_up_to_64k_arrive_whole(configured, size):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(CLIENT_TIMEOUT)
        port, stats = free_ports(2)
        configured(udp_config(port, stats, [f"127.0.0.1:{backend.getsockname()[1]}"]))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_TIMEOUT)
            payload = bytes(i % 251 for i in range(size))
            client.sendto(payload, ("127.0.0.1", port))
            data, upstream = backend.recvfrom(65536)
            assert data == payload
            backend.sendto(payload[::-1], upstream)
            reply, source = client.recvfrom(65536)
            assert reply == payload[::-1] and source == ("127.0.0.1", port)


def test_a_stopped_backends_clients_move(configured, peers):
    unbound, nsd = peers.unbound(), peers.nsd()
    port, stats = free_ports(2)
    pool = (
        'algorithm = "iphash"\n'
        "[pool.servers.check]\n"
        'type = "dns"\nquery = "example.test"\ninterval = 0.2\ntimeout = 0.5\nfall = 1\nrise = 1\n'
    )
    # Flows outlive the check's verdict (a stop waits for them to idle out).
    lb = configured(udp_config(port, stats, [unbound.address, nsd.address], pool=pool, idle=4))
    lb.wait_for(lambda s: all(b["up"] for b in s["backends"]), what="both backends up")
    # A hashing algorithm keeps the client on one server across flows (ports).
    (client_port,) = free_ports(1)
    first = dig(port, source_port=client_port)
    assert first in ([UNBOUND_ANSWER], [NSD_ANSWER])
    assert all(dig(port) == first for _ in range(4))
    serving = unbound if first == [UNBOUND_ANSWER] else nsd
    serving.stop()
    lb.wait_for(lambda s: not lb.backend(serving.address, s)["up"], what=f"{serving.name} down")
    other = [NSD_ANSWER] if serving is unbound else [UNBOUND_ANSWER]
    # The open flow moves on its next datagram, new flows go to the other server too.
    assert dig(port, source_port=client_port) == other
    assert dig(port) == other


def test_a_dns_check_expects_its_rcode(configured, peers):
    unbound = peers.unbound()
    port, stats = free_ports(2)
    pool = '[pool.servers.check]\ntype = "dns"\nquery = "nowhere.example.test"\ninterval = 0.2\n'
    lb = configured(udp_config(port, stats, [unbound.address], pool=pool))

    def checked(s):
        check = lb.backend(unbound.address, s)["history"]["last_check"]
        return check and check["reason"] == "DNS NXDOMAIN" and not check["ok"]

    lb.wait_for(checked, what="a failed NXDOMAIN check")


def test_a_udp_send_expect_check_and_a_refusing_backend(configured):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as answering:
        answering.bind(("127.0.0.1", 0))
        answering.settimeout(CLIENT_TIMEOUT)
        (closed,) = free_ports(1)  # nothing listens there: port unreachable
        port, stats = free_ports(2)
        pool = (
            "[pool.servers.check]\n"
            'type = "send-expect"\nsend = "ping"\nexpect = "pong"\ninterval = 0.2\nfall = 1\n'
        )
        good = f"127.0.0.1:{answering.getsockname()[1]}"
        lb = configured(udp_config(port, stats, [good, f"127.0.0.1:{closed}"], pool=pool))
        data, checker = answering.recvfrom(64)
        assert data == b"ping"
        answering.sendto(b"pong", checker)
        final = lb.wait_for(
            lambda s: (
                lb.backend(good, s)["history"]["last_check"]
                and lb.backend(good, s)["history"]["last_check"]["ok"]
                and not lb.backend(f"127.0.0.1:{closed}", s)["up"]
            ),
            what="the answering backend checked, the closed port marked down",
        )
        assert lb.backend(f"127.0.0.1:{closed}", final)["history"]["last_check"]["reason"] == (
            "refused"
        )


def test_max_flows_evicts_the_oldest(configured):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(CLIENT_TIMEOUT)
        port, stats = free_ports(2)
        # The flows outlive the report (one a second) that counts them: idled out first, the
        # two left would show as none.
        lb = configured(
            udp_config(
                port,
                stats,
                [f"127.0.0.1:{backend.getsockname()[1]}"],
                frontend="max-flows = 2\n",
                idle=4,
            )
        )
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for client in clients:
                client.sendto(b"hello", ("127.0.0.1", port))
                assert backend.recv(64) == b"hello"
        finally:
            for client in clients:
                client.close()
    final = lb.wait_for(lambda s: udp_stats(lb, s)["udp"]["created"] == 3)
    assert udp_stats(lb, final)["udp"]["evicted"] == 1 and udp_stats(lb, final)["active"] == 2


def test_config_refuses_what_udp_cannot_do(tmp_path):
    cases = [
        ('accept-proxy = ["127.0.0.1"]\n', "", "reads no PROXY header"),
        ("", '[pool.servers.check]\ntype = "http"\n', "check type must be one of"),
        ("", 'send-proxy = "v1"\n', "send-proxy is for tcp"),
    ]
    for frontend, pool, message in cases:
        path = tmp_path / "udp.toml"
        path.write_text(udp_config(5300, 8080, ["127.0.0.1:53"], pool=pool, frontend=frontend))
        done = subprocess.run(
            [sys.executable, "-P", "-m", "fastlb", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_replies_leave_from_the_address_the_client_sent_to(configured, peers):
    # Bound to every address, a reply must still come from the one asked (127.0.0.2 here):
    # dig ignores a reply from any other source.
    unbound = peers.unbound()
    port, stats = free_ports(2)
    text = udp_config(port, stats, [unbound.address]).replace(f'"127.0.0.1:{port}"', f'"*:{port}"')
    configured(text)
    assert dig(port, host="127.0.0.2") == [UNBOUND_ANSWER]
    assert dig(port, host="127.0.0.1") == [UNBOUND_ANSWER]


def test_a_draining_worker_serves_its_flows_until_they_idle_out(configured):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(CLIENT_TIMEOUT)
        port, stats = free_ports(2)
        lb = configured(udp_config(port, stats, [f"127.0.0.1:{backend.getsockname()[1]}"], idle=2))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_TIMEOUT)
            client.sendto(b"question", ("127.0.0.1", port))
            data, upstream = backend.recvfrom(64)
            lb.signal(signal.SIGTERM)
            wait_until(lambda: "draining" in lb.log(), START_TIMEOUT, "the drain to start")
            # The flow outlives the stop: its reply still reaches the client.
            backend.sendto(b"answer", upstream)
            assert client.recv(64) == b"answer"
            assert lb.proc.poll() is None
        assert lb.wait_exit() == 0


def test_an_ipv6_frontend_forwards_to_an_ipv4_backend(configured):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(CLIENT_TIMEOUT)
        (port,) = free_ports(1, "::1")
        (stats,) = free_ports(1)
        text = udp_config(port, stats, [f"127.0.0.1:{backend.getsockname()[1]}"])
        configured(text.replace(f'"127.0.0.1:{port}"', f'"[::1]:{port}"'))
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_TIMEOUT)
            client.sendto(b"over six", ("::1", port))
            data, upstream = backend.recvfrom(64)
            backend.sendto(data.upper(), upstream)
            reply, source = client.recvfrom(64)
            assert reply == b"OVER SIX" and source[:2] == ("::1", port)


def test_a_reload_that_removes_a_flows_backend_moves_the_flow(configured):
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second,
    ):
        for backend in (first, second):
            backend.bind(("127.0.0.1", 0))
            backend.settimeout(CLIENT_TIMEOUT)
        addresses = [f"127.0.0.1:{b.getsockname()[1]}" for b in (first, second)]
        port, stats = free_ports(2)
        lb = configured(udp_config(port, stats, addresses[:1], idle=5))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"one", ("127.0.0.1", port))
            assert first.recv(64) == b"one"
            lb.config_path.write_text(udp_config(port, stats, addresses[1:], idle=5))
            os.kill(lb.pid, signal.SIGHUP)
            lb.wait_for(lambda s: [b["address"] for b in s["backends"]] == addresses[1:])
            # The same client address and port: its flow lost its backend, and moves.
            client.sendto(b"two", ("127.0.0.1", port))
            assert second.recv(64) == b"two"
