"""The client side of ``fastlb ctl``: one request over the control socket, and its reply as text."""

from __future__ import annotations

import json
import socket

from fastlb.control.commands import CommandError, parse
from fastlb.control.server import MAX_REQUEST
from fastlb.errors import EXIT_UNREACHABLE, ConfigError, FastlbError

TIMEOUT = 10.0
MAX_REPLY = 64 << 20


class Unreachable(FastlbError):
    exit_code = EXIT_UNREACHABLE


def request(path: str, verb: str, args: list[str]) -> dict:
    """The balancer's reply to one verb; ConfigError when it refuses it (or it is malformed),
    Unreachable when nothing answers at ``path``."""
    body = {"verb": verb, "args": args}
    try:
        parse(body)  # the same checks as the balancer's, before connecting
    except CommandError as exc:
        raise ConfigError(str(exc)) from None
    line = json.dumps(body).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise ConfigError(f"the request is longer than {MAX_REQUEST} bytes")
    data = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(line)
            while len(data) <= MAX_REPLY and (chunk := sock.recv(1 << 16)):
                data += chunk
    except TimeoutError:
        raise Unreachable(f"--control {path}: no answer within {TIMEOUT:g}s") from None
    except OSError as exc:
        raise Unreachable(f"--control {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise Unreachable(f"--control {path}: the reply is not JSON") from None
    if not isinstance(reply, dict):
        raise Unreachable(f"--control {path}: the reply is not a JSON object")
    if not reply.get("ok"):
        raise ConfigError(str(reply.get("error", "refused")))
    return reply


def render(reply: dict) -> str:
    """The reply as text: the message, or show's tables."""
    data = reply.get("data")
    if data is None:
        return f"{reply.get('message', 'done')}\n"
    lines = []
    for frontend in data["frontends"]:
        lines.append(
            f"frontend {frontend['name']} on {', '.join(frontend['listen'])} -> "
            f"{', '.join(frontend['pools'])}: {frontend['active']} active, "
            f"{frontend['connections']} connections"
        )
    columns = ("address", "state", "health", "weight", "runtime", "effective", "active", "conns")
    columns += ("failed", "notes")
    for pool in data["pools"]:
        usable = "" if pool["usable"] else "  NO USABLE BACKEND"
        lines.append(f"pool {pool['name']} ({pool['algorithm']}){usable}")
        rows = [columns]
        for b in pool["backends"]:
            notes = [word for word, on in (("backup", b["backup"]), ("added", b["added"])) if on]
            if b["agent"]:
                notes.append(f"agent:{b['agent']}")
            runtime = "-" if b["runtime_weight"] is None else str(b["runtime_weight"])
            rows.append(
                (b["address"], b["state"], b["health"], str(b["weight"]), runtime)
                + (f"{b['effective_weight']:g}", str(b["active"]), str(b["connections"]))
                + (str(b["failed"]), ",".join(notes) or "-")
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines) + "\n"
