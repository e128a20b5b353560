"""The configuration file: the settings of ``fastlb run`` in TOML, one key per flag.

Keys are the flag names without their dashes (``max-conn``, or ``max_conn``); ``backend`` (or
``backends``) takes a list of the strings ``--backend`` takes, and ``check`` a boolean::

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
Flags given on the command line win over the file.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from fastlb.errors import ConfigError
from fastlb.settings import OPTIONS, Option

_BY_KEY: dict[str, Option] = {}
for _option in OPTIONS:
    _BY_KEY[_option.flag[2:]] = _BY_KEY[_option.name] = _option
    _BY_KEY[_option.flag[2:].replace("-", "_")] = _option
_KEY_LINE = re.compile(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")
_TABLE_LINE = re.compile(r"^\s*\[+\s*([^\]\s]+)")
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)$")


def read(path: str) -> dict[str, Any]:
    """Parsed values by option name (as :class:`~fastlb.settings.Settings` names them).

    Raises ConfigError with ``PATH:LINE:`` in front of the reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
        document = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            where, message = position.group(1), message[: position.start()].rstrip()
            raise ConfigError(f"{path}:{where}: {message}") from None
        raise ConfigError(f"{path}: {message}") from None

    lines = _key_lines(text)
    values: dict[str, Any] = {}
    for key, value in document.items():
        where = f"{path}:{lines.get(key, '?')}"
        option = _BY_KEY.get(key)
        if option is None:
            known = ", ".join(o.flag[2:] for o in OPTIONS)
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {known})")
        if option.name in values:
            raise ConfigError(f"{where}: {key} is set twice")
        try:
            values[option.name] = _parse(option, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return values


def _parse(option: Option, value: Any) -> Any:
    if option.is_switch:
        if not isinstance(value, bool):
            raise ConfigError(f"{option.flag[2:]} must be true or false")
        return value
    if option.many:
        items = value if isinstance(value, list) else [value]
        return option.value([_scalar(option, item) for item in items])
    return option.value(_scalar(option, value))


def _scalar(option: Option, value: Any) -> str:
    # Values reach the flag's parser as the text a user would type after the flag.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{option.flag[2:]} takes a string or a number, not {value!r}")
    return str(value)


def _key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key and table, for error messages."""
    lines: dict[str, int] = {}
    in_table = False  # keys inside a table are not settings (the table itself is reported)
    for number, line in enumerate(text.splitlines(), 1):
        table = _TABLE_LINE.match(line)
        if table:
            in_table = True
            lines.setdefault(table.group(1).strip("\"'"), number)
        elif not in_table and (key := _KEY_LINE.match(line)):
            lines.setdefault(next(group for group in key.groups() if group is not None), number)
    return lines
