"""The configuration file: TOML, keys named after the flags, mistakes reported as FILE:LINE.

Keys are the flag names without their dashes (``max-conn``, or ``max_conn``); ``backend`` (or
``backends``) takes a list of the strings ``--backend`` takes, and ``check`` a boolean. Settings
of the health checks that have no flag have top-level keys all the same (``check-jitter``)::

    listen = "0.0.0.0:80"
    algorithm = "leastconn"
    connect-timeout = "3s"
    check = true
    backend = [
        "10.0.0.11:8080",
        "10.0.0.12:8080,weight=2",
        "10.0.0.13:8080,backup",
    ]

Every value is checked by the same parser as its flag, and every mistake becomes one line naming
the file and line: ``fastlb.toml:3: --workers many: must be a whole number, not 'many'``.
:func:`open_document` reads a whole file, tables included, and remembers the line of every key;
:mod:`fastlb.config` makes frontends and pools of it.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from fastlb.errors import ConfigError
from fastlb.settings import OPTIONS, Option

_BY_KEY: dict[str, Option] = {}
for _option in OPTIONS:
    _BY_KEY[_option.key] = _BY_KEY[_option.name] = _option
    _BY_KEY[_option.key.replace("-", "_")] = _option
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)$")
_KEY_PART = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*""")


class Document:
    """A parsed TOML file and the line of every key and table in it."""

    def __init__(self, path: str, values: dict[str, Any], lines: dict[tuple[str, ...], int]):
        self.path = path
        self.values = values
        self.lines = lines

    def where(self, *keys: str) -> str:
        """``PATH:LINE`` of the key at ``keys`` (a table's keys, then the key), or of the
        nearest table around it that has a line."""
        for end in range(len(keys), 0, -1):
            line = self.lines.get(keys[:end])
            if line is not None:
                return f"{self.path}:{line}"
        return f"{self.path}:?"


def option(key: str) -> Option | None:
    """The option a file key names: the flag without dashes, with - or _ between words."""
    return _BY_KEY.get(key)


def open_document(path: str) -> Document:
    """Reads and parses ``path``; raises ConfigError with ``PATH:LINE:`` in front of the reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
        values = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            where, message = position.group(1), message[: position.start()].rstrip()
            raise ConfigError(f"{path}:{where}: {message}") from None
        raise ConfigError(f"{path}: {message}") from None
    return Document(path, values, _key_lines(text))


def parse(option: Option, value: Any, where: str, label: str | None = None) -> Any:
    """A TOML value parsed as its flag's value; ConfigError with ``where`` in front. Messages
    name the option as ``label`` when given (a check table's key); otherwise a wrong type names
    its key and a bad value its flag (its key when it has no flag), as on the command line."""
    key = label or option.key  # type mistakes name the key; bad values, the flag as elsewhere
    try:
        if option.is_switch or option.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false")
            return value if option.is_switch else option.value(str(value).lower(), label)
        if option.joins_list and isinstance(value, list) and value:
            value = ",".join(_scalar(option, item, key) for item in value)
        if option.many:
            items = value if isinstance(value, list) else [value]
            return option.value([_scalar(option, item, key) for item in items], label)
        return option.value(_scalar(option, value, key), label)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_TEXT_TYPES = (str, str | None, bytes, bytes | None)


def _scalar(option: Option, value: Any, label: str) -> str:
    # Values reach the flag's parser as the text a user would type after the flag.
    if option.type in _TEXT_TYPES:
        if not isinstance(value, str):
            raise ConfigError(f"{label} takes a string, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{label} takes a string or a number, not {value!r}")
    return str(value)


# ---- where each key is -------------------------------------------------------------------------


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The first line of each key and table, by its full dotted path (a table's keys, then the
    key). Lines inside multi-line arrays and strings are values, not keys, and are skipped;
    keys of inline tables share the line of the key they belong to."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    depth = 0  # brackets of a value still open at the end of the line
    string: str | None = None  # the delimiter of a multi-line string still open

    def record(path: tuple[str, ...], number: int) -> None:
        for end in range(1, len(path) + 1):  # a.b.c = 1 also makes tables a and a.b
            lines.setdefault(path[:end], number)

    for number, line in enumerate(text.splitlines(), 1):
        start = 0
        if depth == 0 and string is None:
            stripped = line.lstrip()
            if stripped.startswith("["):
                opening = len(line) - len(stripped) + (2 if stripped.startswith("[[") else 1)
                path, end = _dotted_key(line, opening)
                if path and line[end : end + 1] == "]":
                    table = path
                    record(table, number)
                continue
            path, end = _dotted_key(line, 0)
            if not path or line[end : end + 1] != "=":
                continue
            record(table + path, number)
            start = end + 1
        depth, string = _scan_value(line, start, depth, string)
    return lines


def _dotted_key(line: str, start: int) -> tuple[tuple[str, ...], int]:
    """The dotted key at ``start`` (``a."b.c".d``) and where it ends; () when there is none."""
    parts: list[str] = []
    position = start
    while match := _KEY_PART.match(line, position):
        parts.append(next(group for group in match.groups() if group is not None))
        position = match.end()
        if line[position : position + 1] != ".":
            return tuple(parts), position
        position += 1
    return (), start


def _scan_value(line: str, start: int, depth: int, string: str | None) -> tuple[int, str | None]:
    """Follows brackets and strings from ``start`` to the end of the line (or a comment)."""
    position = start
    while position < len(line):
        if string is not None:
            end = line.find(string, position)
            if end < 0:
                return depth, string
            position, string = end + len(string), None
            continue
        char = line[position]
        if char == "#":
            break
        if line.startswith(('"""', "'''"), position):
            string = line[position : position + 3]
            position += 3
            continue
        if char in "\"'":
            end = position + 1
            while end < len(line) and line[end] != char:
                end += 2 if char == '"' and line[end] == "\\" else 1
            position = end + 1
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        position += 1
    return depth, string
