"""fastlb ctl end to end: a running balancer with real backends, changed through its control
socket, with the traffic and the state file checked after each verb."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections import Counter

from conftest import CLIENT_TIMEOUT, assert_closed, free_ports, recv_line, wait_until

CTL_TIMEOUT = 30.0


def ctl(lb, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Runs ``fastlb ctl --control PATH ARGS`` (from outside the source tree)."""
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "ctl", "--control", lb.control, *args],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
        cwd=os.path.dirname(lb.control),
    )
    assert result.returncode == expect, f"ctl {args}: {result.returncode} {result.stderr}"
    return result


def show(lb, pool: str = "default") -> dict:
    """The backends of a pool by address, as ``ctl --json show`` gives them."""
    reply = json.loads(ctl(lb, "--json", "show", pool).stdout)
    (entry,) = reply["data"]["pools"]
    return {backend["address"]: backend for backend in entry["backends"]}


def start(balancer, tmp_path, backends: list, *flags: str, workers: int = 1, state: bool = False):
    control = str(tmp_path / "control.sock")
    extra = ["--control", control, "--algorithm", "roundrobin"]
    if state:
        extra += ["--state-file", str(tmp_path / "state.json")]
    lb = balancer(backends, *extra, *flags, workers=workers)
    lb.control = control
    return lb


def names(lb, count: int) -> Counter:
    return Counter(lb.ask_name() for _ in range(count))


def held_connection(lb, name: str) -> socket.socket:
    """A client connection that the balancer sent to the backend called ``name``."""
    for _ in range(50):
        sock = lb.connect()
        if recv_line(sock) == name:
            return sock
        sock.close()
    raise AssertionError(f"no connection reached {name}")


def echoes(sock: socket.socket) -> bool:
    sock.sendall(b"ping\n")
    return recv_line(sock) == "ping"


def test_the_control_socket_is_mode_0600_and_show_lists_every_backend(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two])
    mode = os.stat(lb.control).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    lb.ask_name()
    listed = show(lb)
    assert set(listed) == {one.address, two.address}
    for entry in listed.values():
        assert entry["state"] == "up" and entry["health"] == "up"
        assert entry["weight"] == 1 and entry["effective_weight"] == 1
        assert entry["runtime_weight"] is None
    assert sum(entry["connections"] for entry in listed.values()) >= 0
    text = ctl(lb, "show").stdout
    assert one.address in text and two.address in text and "pool default" in text
    lb.signal(signal.SIGTERM)
    assert lb.wait_exit() == 0
    assert not os.path.exists(lb.control)


def test_drain_sends_new_connections_elsewhere_and_lets_open_ones_finish(
    balancer, backends, tmp_path
):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two], "--on-down", "close")
    held = held_connection(lb, "one")
    assert "draining" in ctl(lb, "drain", f"default/{one.address}").stdout
    wait_until(lambda: names(lb, 4) == Counter(two=4), CLIENT_TIMEOUT, "traffic to leave one")
    assert names(lb, 10) == Counter(two=10)
    assert echoes(held), "the drained backend's open connection was cut"
    assert show(lb)[one.address]["state"] == "draining"
    assert show(lb)[one.address]["active"] == 1
    ctl(lb, "enable", f"default/{one.address}")
    wait_until(lambda: "one" in names(lb, 4), CLIENT_TIMEOUT, "traffic back on one")
    held.close()


def test_disable_stops_traffic_and_checks_and_enable_brings_both_back(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two], "--check", "--check-interval", "0.1s")
    result = ctl(lb, "disable", f"default/{two.address}")
    assert "disabled" in result.stdout and result.stderr == ""
    wait_until(lambda: names(lb, 4) == Counter(one=4), CLIENT_TIMEOUT, "traffic to leave two")
    entry = show(lb)[two.address]
    assert entry["state"] == "disabled" and entry["effective_weight"] == 0
    # No checks while disabled: one is still checked (connected to), two is not.
    for _ in range(2):
        one.next_event("open")
    while not two.events.empty():
        two.events.get()
    for _ in range(5):
        one.next_event("open")
    assert all(event["event"] != "open" for event in list(two.events.queue))
    ctl(lb, "enable", f"default/{two.address}")
    wait_until(lambda: "two" in names(lb, 4), CLIENT_TIMEOUT, "traffic back on two")
    assert show(lb)[two.address]["state"] == "up"


def test_a_runtime_weight_shows_in_the_traffic_split(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two])
    assert names(lb, 20) == Counter(one=10, two=10)
    ctl(lb, "weight", f"default/{one.address}", "3")
    entry = show(lb)[one.address]
    assert (entry["weight"], entry["runtime_weight"], entry["effective_weight"]) == (1, 3, 3)
    # The first connection may still meet the old table; the rest split 3 to 1.
    lb.ask_name()
    split = names(lb, 80)
    assert abs(split["one"] - 60) <= 3, split


def test_add_then_remove_a_backend_with_open_connections(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one], workers=2)
    assert "added" in ctl(lb, "add", "default", f"{two.address},weight=2").stdout
    wait_until(lambda: "two" in names(lb, 6), CLIENT_TIMEOUT, "traffic to the added backend")
    assert show(lb)[two.address]["added"] is True
    held = [held_connection(lb, "two") for _ in range(2)]
    ctl(lb, "remove", f"default/{two.address}")
    wait_until(lambda: names(lb, 4) == Counter(one=4), CLIENT_TIMEOUT, "traffic to leave two")
    assert names(lb, 10) == Counter(one=10)
    entry = show(lb)[two.address]
    assert entry["state"] == "removing"
    wait_until(lambda: show(lb)[two.address]["active"] == 2, CLIENT_TIMEOUT, "2 open on two")
    held[0].close()
    assert echoes(held[1]), "a removed backend's open connection was cut"
    wait_until(lambda: show(lb)[two.address]["active"] == 1, CLIENT_TIMEOUT, "1 open on two")
    assert two.address in show(lb), "gone while a connection was open"
    held[1].close()
    wait_until(lambda: two.address not in show(lb), CLIENT_TIMEOUT, "two gone from show")
    assert names(lb, 4) == Counter(one=4)
    # Gone: a second remove is refused.
    result = ctl(lb, "remove", f"default/{two.address}", expect=2)
    assert result.stderr.count("\n") == 1 and "no backend" in result.stderr


def test_kill_sessions_resets_the_open_connections_of_a_backend(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two], workers=2)
    held = [held_connection(lb, "one") for _ in range(2)]
    spared = held_connection(lb, "two")
    wait_until(lambda: show(lb)[one.address]["active"] == 2, CLIENT_TIMEOUT, "2 open on one")
    result = ctl(lb, "kill-sessions", f"default/{one.address}")
    assert "resetting its 2 open connections" in result.stdout
    for sock in held:
        assert_closed(sock)
    assert echoes(spared)
    wait_until(lambda: show(lb)[one.address]["active"] == 0, CLIENT_TIMEOUT, "none open on one")
    wait_until(lambda: "one" in names(lb, 4), CLIENT_TIMEOUT, "new connections still reach one")


def test_runtime_changes_and_health_survive_a_restart(balancer, backends, tmp_path):
    one, two, three = (backends("name", name) for name in ("one", "two", "three"))
    flags = ("--check", "--check-interval", "0.1s", "--fall", "1")
    lb = start(balancer, tmp_path, [one, two], *flags, state=True)
    ctl(lb, "drain", f"default/{one.address}")
    ctl(lb, "weight", f"default/{two.address}", "5")
    ctl(lb, "add", "default", f"{three.address},backup")
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["version"] == 1 and len(state["backends"]) == 3
    lb.signal(signal.SIGTERM)
    assert lb.wait_exit() == 0
    # three went down while the first balancer ran no more: the second starts it down.
    again = start(balancer, tmp_path, [one, two], *flags, state=True)
    listed = show(again)
    assert listed[one.address]["state"] == "draining"
    assert listed[two.address]["runtime_weight"] == 5
    assert listed[three.address]["added"] is True and listed[three.address]["backup"] is True
    assert names(again, 6) == Counter(two=6)
    three.kill()
    wait_until(lambda: show(again)[three.address]["health"] == "down", CLIENT_TIMEOUT, "three down")
    wait_until(
        lambda: any(
            entry.get("health") == "down"
            for entry in json.loads((tmp_path / "state.json").read_text())["backends"]
        ),
        CLIENT_TIMEOUT,
        "the state file to say three is down",
    )
    again.signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    third = start(balancer, tmp_path, [one, two], *flags, state=True)
    assert show(third)[three.address]["health"] == "down"


def test_a_backend_the_config_drops_loses_its_runtime_state(balancer, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [one, two], state=True)
    ctl(lb, "drain", f"default/{two.address}")
    lb.signal(signal.SIGTERM)
    assert lb.wait_exit() == 0
    again = start(balancer, tmp_path, [one], state=True)
    assert set(show(again)) == {one.address}
    assert "its runtime state is dropped" in again.log()
    assert json.loads((tmp_path / "state.json").read_text())["backends"] == []


def request(path: str, data: bytes, shut: bool = True) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect(path)
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return json.loads(reply)


def test_malformed_oversized_and_slow_requests_get_errors_and_disturb_nothing(
    balancer, backends, tmp_path
):
    one = backends("name", "one")
    lb = start(balancer, tmp_path, [one])
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(lb.control)
    slow.sendall(b'{"verb": "sh')  # and never the rest
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(lb.control)
    for data, error in [
        (b"not json\n", "not a JSON object"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"verb": "explode"}\n', "unknown verb"),
        (b'{"verb": "drain", "args": [7]}\n', "list of strings"),
        (b'{"verb": "drain", "args": []}\n', "usage: drain POOL/ADDR"),
        (b'{"verb": "weight", "args": ["default/127.0.0.1:1", "-1"]}\n', "whole number"),
        (b"[" * 100000 + b"\n", "longer than"),
        (b"x" * (1 << 20), "longer than"),
        (b"[" * 50000 + b"\n", "not a JSON object"),
    ]:
        reply = request(lb.control, data)
        assert reply["ok"] is False and error in reply["error"], (data[:40], reply)
    assert request(lb.control, b'{"verb": "show"}')["ok"] is True  # no newline: EOF ends it
    assert show(lb)[one.address]["state"] == "up"
    assert lb.ask_name() == "one"
    # The slow client is dropped after its timeout; the balancer served everyone meanwhile.
    slow.settimeout(CLIENT_TIMEOUT)
    assert slow.recv(100) == b""
    slow.close()
    silent.close()
    assert lb.proc.poll() is None


def test_a_bad_command_is_one_line_and_a_non_zero_exit(balancer, backends, tmp_path):
    one = backends("name", "one")
    lb = start(balancer, tmp_path, [one])
    for args, words in [
        (("drain", f"nosuch/{one.address}"), "no pool 'nosuch'"),
        (("drain", "default/127.0.0.1:1"), "no backend 127.0.0.1:1 in pool default"),
        (("drain", "default"), "expected POOL/ADDR"),
        (("weight", f"default/{one.address}", "lots"), "whole number"),
        (("add", "default", one.address), "already in the pool"),
        (("add", "default", "example.test:80"), "numeric IP"),
        (("frobnicate",), "unknown verb"),
        (("reload",), "nothing to reload"),
    ]:
        result = ctl(lb, *args, expect=2)
        assert result.stderr.startswith("fastlb: error: ") and result.stderr.count("\n") == 1
        assert words in result.stderr, result.stderr
        assert result.stdout == ""
    lb.control = str(tmp_path / "nobody.sock")
    result = ctl(lb, "show", expect=4)
    assert result.stderr.count("\n") == 1 and "nobody.sock" in result.stderr


def test_ctl_reload_reports_a_bad_file_and_keeps_added_backends(configured, backends, tmp_path):
    one, two = backends("name", "one"), backends("name", "two")
    stats, port = free_ports(2)
    control = str(tmp_path / "control.sock")
    text = (
        f'stats = "127.0.0.1:{stats}"\ncontrol = "{control}"\n'
        f'[frontend.web]\nlisten = ["127.0.0.1:{port}"]\npool = "web"\n'
        f'[pool.web]\nbackend = ["{one.address}"]\n'
    )
    lb = configured(text)
    lb.control = control
    ctl(lb, "add", "web", two.address)
    lb.config_path.write_text(text + "algorithm = 7\n")
    result = ctl(lb, "reload", expect=2)
    assert f"{lb.config_path}:" in result.stderr and result.stderr.count("\n") == 1
    assert set(show(lb, "web")) == {one.address, two.address}
    lb.config_path.write_text(text.replace(one.address, f"{one.address},weight=2"))
    assert ctl(lb, "reload").stdout == "reloaded\n"
    listed = show(lb, "web")
    assert listed[one.address]["weight"] == 2 and listed[two.address]["added"] is True


def test_a_pool_with_no_usable_backend_is_a_warning_at_start_ctl_and_check(
    balancer, backends, tmp_path
):
    one, two = backends("name", "one"), backends("name", "two")
    lb = start(balancer, tmp_path, [f"{one.address},weight=0", two])
    assert "no usable backend" not in lb.log()
    result = ctl(lb, "disable", f"default/{two.address}")
    assert "fastlb: warning: pool default has no usable backend" in result.stderr
    assert "pool default has no usable backend" in lb.log()
    assert json.loads(ctl(lb, "--json", "show").stdout)["data"]["pools"][0]["usable"] is False
    ctl(lb, "enable", f"default/{two.address}")
    (tmp_path / "zero").mkdir()
    zero = start(balancer, tmp_path / "zero", [f"{one.address},weight=0"])
    assert "pool default has no usable backend: every backend has weight 0" in zero.log()
    check = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "check", "--listen", "127.0.0.1:0"]
        + ["--backend", f"{one.address},weight=0"],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
        cwd=tmp_path,
    )
    assert check.returncode == 0
    assert "fastlb: warning: pool default has no usable backend" in check.stderr
