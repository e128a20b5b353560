"""The configuration of one fastlb: frontends and pools from the flags and the --config file.

The file is TOML. Top-level keys are the flags (see :mod:`fastlb.config_file`); tables describe
more services, each frontend naming the pool its clients go to::

    workers = 4

    [frontend.tls]
    listen = ["127.0.0.1:8443", "[::1]:8443"]
    pool = "web"                                   # the default route
    sni = { "api.example.test" = "api", "*.example.test" = "web" }
    accept-proxy = ["127.0.0.0/8"]

    [pool.web]
    algorithm = "leastconn"
    backend = ["127.0.0.1:9001", "127.0.0.1:9002,weight=2"]
    send-proxy = "v2"

    [pool.web.check]                               # active health checks
    type = "http"
    path = "/health"

The flags and the top-level keys describe the frontend and the pool named ``default``: the
frontend exists when ``listen`` is given, the pool when ``backend`` is. Their other frontend and
pool settings are also the defaults of every table that does not set them itself, as HAProxy's
``defaults`` section; a key in a table wins over both, and a flag wins over a top-level key.
The check settings at the top level (``check-type``, ``check-path``, ``rise``) are likewise the
defaults of every pool's check whose type takes them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastlb import config_file, model, settings
from fastlb.config_file import Document
from fastlb.errors import ConfigError
from fastlb.model import DEFAULT, Address, CheckSpec, Config, FrontendSpec, PoolSpec, SniRoute
from fastlb.settings import CHECK, FRONTEND, OPTIONS, POOL, PROCESS, Option

FRONTEND_KEYS = ("pool", "sni", "sni-required")  # frontend table keys that are no flags
POOL_KEYS = ("check",)  # true, false or the [pool.NAME.check] table
# Only the default frontend and pool have the listen and backend of the flags and top level.
_NOT_INHERITED = ("listen", "backends", "protocol")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_HOST_NAME = 253


@dataclass(frozen=True)
class _Given:
    """A parsed value and where it was given: ``PATH:LINE``, or "" for a flag."""

    value: Any
    where: str

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}" if self.where else message)


def _scoped(scope: str) -> tuple[Option, ...]:
    return tuple(option for option in OPTIONS if option.scope == scope)


def load(values: Mapping[str, Any], path: str | None) -> Config:
    """The configuration from raw flag values by option name (strings as typed, lists of them
    for repeatable flags; None or False when not given) and the TOML file at ``path``.

    Raises ConfigError: one line, ``PATH:LINE:`` in front for a mistake in the file."""
    document = config_file.open_document(path) if path else None
    top = _top_level(values, document)
    _check_top_level(top)
    frontend_tables = _tables(document, "frontend")
    pool_tables = _tables(document, "pool")

    pools: list[PoolSpec] = []
    if "backends" in top:
        if DEFAULT in pool_tables:
            raise ConfigError(
                f"{document.where('pool', DEFAULT)}: [pool.{DEFAULT}] is also given by backend "
                "at the top level (or --backend); use one of them"
            )
        pools.append(_pool(DEFAULT, top, None, document))
    for name, table in pool_tables.items():
        pools.append(_pool(name, top, table, document))

    frontends: list[FrontendSpec] = []
    # listen addresses so far, by protocol and address: the frontend using each
    used: dict[tuple[str, Address], str] = {}
    if "listen" in top:
        if DEFAULT in frontend_tables:
            raise ConfigError(
                f"{document.where('frontend', DEFAULT)}: [frontend.{DEFAULT}] is also given "
                "by listen at the top level (or --listen); use one of them"
            )
        if not any(pool.name == DEFAULT for pool in pools):
            raise ConfigError(
                "at least one --backend is required (or backend in the --config file)"
            )
        frontends.append(_frontend(DEFAULT, top, None, document, pools, used))
    for name, table in frontend_tables.items():
        frontends.append(_frontend(name, top, table, document, pools, used))
    if not frontends:
        raise ConfigError("--listen is required (or a [frontend.NAME] in the --config file)")
    pools = _with_protocols(frontends, pools)
    process = {option.attribute: _value(option, top, {}, True) for option in _scoped(PROCESS)}
    return Config(frontends=tuple(frontends), pools=tuple(pools), **process)


def _with_protocols(frontends: list[FrontendSpec], pools: list[PoolSpec]) -> list[PoolSpec]:
    """Each pool with the protocol of the frontends that route to it: one, as a UDP pool's
    backends and checks are not a TCP pool's."""
    protocols: dict[str, str] = {}
    for frontend in frontends:
        if frontend.protocol == "udp" and (frontend.sni or frontend.accept_proxy):
            raise ConfigError(
                f"frontend {frontend.name}: a udp frontend reads no PROXY header or SNI "
                "(accept-proxy, sni)"
            )
        for name in frontend.pools():
            other = protocols.setdefault(name, frontend.protocol)
            if other != frontend.protocol:
                raise ConfigError(
                    f"pool {name} is used by both tcp and udp frontends; give each its own pool"
                )
    result = []
    for pool in pools:
        protocol = protocols.get(pool.name, "tcp")
        udp_check = pool.check.type in model.UDP_CHECK_TYPES
        if protocol == "udp" and pool.check.active and not udp_check:
            raise ConfigError(
                f"pool {pool.name} serves udp: its check type must be one of "
                f"{', '.join(model.UDP_CHECK_TYPES)}, not {pool.check.type}"
            )
        if protocol == "tcp" and pool.check.type == "dns":
            raise ConfigError(f"pool {pool.name}: dns checks are for pools of udp frontends")
        if protocol == "udp" and pool.send_proxy:
            raise ConfigError(f"pool {pool.name} serves udp: send-proxy is for tcp")
        result.append(dataclasses.replace(pool, protocol=protocol))
    return result


# ---- reading -----------------------------------------------------------------------------------


def _top_level(values: Mapping[str, Any], document: Document | None) -> dict:
    """Every option given by a flag or a top-level key, by name; a flag wins."""
    given: dict[str, _Given] = {}
    if document is not None:
        for key, value in document.values.items():
            if key in ("frontend", "pool"):
                continue
            where = document.where(key)
            option = config_file.option(key)
            if option is None:
                known = ", ".join(o.key for o in OPTIONS)
                raise ConfigError(
                    f"{where}: unknown setting {key!r} (known: {known}, and the tables "
                    "[frontend.NAME] and [pool.NAME])"
                )
            if option.name in given:
                raise ConfigError(f"{where}: {key} is set twice")
            given[option.name] = _Given(config_file.parse(option, value, where), where)
    for option in OPTIONS:
        raw = values.get(option.name)
        if raw is not None and raw is not False:
            for other in OPTIONS:  # a flag wins over the file's other spelling of its value
                if other.attribute == option.attribute and other.scope == option.scope:
                    given.pop(other.name, None)
            given[option.name] = _Given(option.value(raw), "")
    return given


def _tables(document: Document | None, kind: str) -> dict[str, dict]:
    """The [frontend.NAME] or [pool.NAME] tables of the file, by name."""
    if document is None or kind not in document.values:
        return {}
    tables = document.values[kind]
    if not isinstance(tables, dict):
        raise ConfigError(f"{document.where(kind)}: {kind} takes tables: [{kind}.NAME]")
    for name, table in tables.items():
        where = document.where(kind, name)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {kind}.{name} is not a table; write [{kind}.{name}]")
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: {kind} name {name!r}: use letters, digits, '_', '.' and '-'"
            )
    return tables


def _section(
    kind: str, name: str, table: dict, document: Document | None, extra: tuple
) -> dict[str, _Given]:
    """The options set in one [frontend.NAME] or [pool.NAME] table, and its ``extra`` keys
    (by their names with dashes) as they are."""
    own = _scoped(kind)
    given: dict[str, _Given] = {}
    for key, value in table.items():
        where = document.where(kind, name, key)
        option = config_file.option(key)
        extra_key = key.replace("_", "-")
        if extra_key in extra:
            if extra_key in given:
                raise ConfigError(f"{where}: {key} is set twice")
            given[extra_key] = _Given(value, where)
            continue
        if option is not None and option.scope == CHECK:
            table = f"[pool.{name}.check]" if kind == POOL else "a [pool.NAME.check] table"
            raise ConfigError(
                f"{where}: {key} in [{kind}.{name}] is a check setting: set "
                f"{option.table_key} in {table}"
            )
        if option is None or option.scope != kind:
            takes = ", ".join([o.key for o in own] + list(extra))
            other = f"; {key} is a {option.scope} setting" if option else ""
            raise ConfigError(
                f"{where}: unknown key {key!r} in [{kind}.{name}]{other} (a {kind} takes: {takes})"
            )
        if option.name in given:
            raise ConfigError(f"{where}: {key} is set twice")
        given[option.name] = _Given(config_file.parse(option, value, where), where)
    return given


def _value(option: Option, top: dict[str, _Given], section: dict[str, _Given], default: bool):
    """A setting of a frontend or pool: its table's, else the flag's or top level's, else the
    option's default. Only the ``default`` frontend and pool take listen and backend from the
    top."""
    if option.name in section:
        return section[option.name].value
    if option.name in top and (default or option.name not in _NOT_INHERITED):
        return top[option.name].value
    return option.value(None)


def _pool(name: str, top: dict, table: dict | None, document: Document | None) -> PoolSpec:
    """The default pool (``table`` None: flags and top level) or a [pool.NAME] table."""
    section = {} if table is None else _section(POOL, name, table, document, POOL_KEYS)
    values = {
        option.attribute: _value(option, top, section, table is None) for option in _scoped(POOL)
    }
    given = top["backends"] if table is None else section.get("backends")
    if given is None:
        raise ConfigError(f"{document.where('pool', name)}: [pool.{name}] has no backend")
    if not values["backends"]:
        raise given.error(f"pool {name} has no backend")
    seen = set()
    for backend in values["backends"]:
        if backend.address in seen:
            what = "--backend" if table is None else f"pool {name}: backend"
            raise given.error(f"{what} {backend.address} is given twice")
        seen.add(backend.address)
    return PoolSpec(name=name, check=_check(name, top, section.get("check"), document), **values)


def _frontend(
    name: str,
    top: dict,
    table: dict | None,
    document: Document | None,
    pools: list[PoolSpec],
    used: dict[Address, str],
) -> FrontendSpec:
    """The default frontend (``table`` None: flags and top level) or a [frontend.NAME] table.
    ``used`` holds the listen addresses of the frontends before, by address."""
    section = {} if table is None else _section(FRONTEND, name, table, document, FRONTEND_KEYS)
    values = {
        option.attribute: _value(option, top, section, table is None)
        for option in _scoped(FRONTEND)
    }
    names = [pool.name for pool in pools]
    given = top["listen"] if table is None else section.get("listen")
    if given is None:
        raise ConfigError(f"{document.where('frontend', name)}: [frontend.{name}] has no listen")
    if not values["listen"]:
        raise given.error(f"frontend {name} has no listen address")
    for address in values["listen"]:
        if address.port == 0:  # each one binds a port of its own
            continue
        key = (values["protocol"], address)  # TCP and UDP may share a port
        if key in used:
            if used[key] != name:
                raise given.error(f"listen {address} is also used by frontend {used[key]}")
            raise given.error(
                f"{'--listen' if table is None else 'listen'} {address} is given twice"
            )
        used[key] = name

    pool = section.get("pool")
    if pool is None:
        if DEFAULT not in names:
            raise ConfigError(
                f"{document.where('frontend', name)}: [frontend.{name}] has no pool = NAME "
                "(the pool its clients go to)"
            )
        route = DEFAULT
    else:
        route = _pool_name(pool, names, f"frontend {name}: pool")
    routes = _sni_routes(section.get("sni"), names, name, document)
    required = section.get("sni-required")
    sni_required = False
    if required is not None:
        if not isinstance(required.value, bool):
            raise required.error("sni-required must be true or false")
        if required.value and not routes:
            raise required.error("sni-required is set but the frontend has no sni routes")
        sni_required = required.value
    return FrontendSpec(name=name, pool=route, sni=routes, sni_required=sni_required, **values)


def _pool_name(given: _Given, names: list[str], what: str) -> str:
    if not isinstance(given.value, str):
        raise given.error(f"{what} takes the name of a pool, not {given.value!r}")
    if given.value not in names:
        known = ", ".join(names) or "none"
        raise given.error(f"{what}: no pool named {given.value!r} (pools: {known})")
    return given.value


def _sni_routes(
    given: _Given | None, names: list[str], frontend: str, document: Document | None
) -> tuple[SniRoute, ...]:
    if given is None:
        return ()
    if not isinstance(given.value, dict):
        raise given.error(
            'sni takes a table of host name = pool, as in sni = { "api.example.test" = "api" }'
        )
    routes: dict[str, SniRoute] = {}
    for text, target in given.value.items():
        where = _Given(target, document.where("frontend", frontend, "sni", text))
        try:
            pattern = sni_pattern(text)
        except ValueError as exc:
            raise where.error(f"sni {text!r}: {exc}") from None
        if pattern in routes:
            raise where.error(f"sni {text!r} is given twice (as {pattern!r})")
        routes[pattern] = SniRoute(
            pattern, _pool_name(where, names, f"frontend {frontend}: sni {text!r}")
        )
    return tuple(routes.values())


def sni_pattern(text: str) -> str:
    """The pattern of an SNI route, lower-cased: a DNS host name, or ``*.`` and one.

    Raises ValueError saying what is wrong with it."""
    if not text.isascii():
        raise ValueError("write an international name in its xn-- (punycode) form")
    pattern = text.lower()
    if len(pattern) > MAX_HOST_NAME:
        raise ValueError(f"a host name has at most {MAX_HOST_NAME} characters")
    name = pattern[2:] if pattern.startswith("*.") else pattern
    for label in name.split("."):
        if "*" in label:
            raise ValueError("* may only be the whole first label, as in *.example.test")
        if not label:
            raise ValueError("empty label (two dots in a row, or a dot at an end)")
        if len(label) > 63:
            raise ValueError(f"label {label[:20]}... is longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"label {label!r}: letters, digits and '-' only, and no '-' first or last"
            )
    return pattern


# ---- health checks: [pool.NAME.check] ----------------------------------------------------------

_CHECK_OPTIONS = tuple(option for option in OPTIONS if option.scope == CHECK)
_CHECK_BY_KEY = {option.table_key: option for option in _CHECK_OPTIONS}
_TYPE = _CHECK_BY_KEY["type"]
_ACTIVE = _CHECK_BY_KEY["active"]


def _fits(option: Option, check_type: str) -> bool:
    """Whether a check of ``check_type`` takes the option."""
    return not option.check_types or check_type in option.check_types


def _for_types(option: Option) -> str:
    return f"type{'s' if len(option.check_types) > 1 else ''} {', '.join(option.check_types)}"


def check_keys(check_type: str) -> list[str]:
    """The keys of a [pool.NAME.check] table of ``check_type``."""
    return [option.table_key for option in _CHECK_OPTIONS if _fits(option, check_type)]


def _check_top_level(top: dict[str, _Given]) -> None:
    """The flags and top-level keys of the checks are one check description, the defaults of
    every pool's: each must fit its type, and text and hex spellings of one value exclude each
    other."""
    check_type = top[_TYPE.name].value if _TYPE.name in top else _TYPE.value(None)
    given = [settings.OPTIONS_BY_NAME[name] for name in top]
    given = [option for option in given if option.scope == CHECK]
    for option in given:
        if not _fits(option, check_type):
            raise top[option.name].error(
                f"{option.label} is for {_for_types(option)}, and the check type is "
                f"{check_type} ({_TYPE.label})"
            )
    _one_spelling_each(given, lambda option: top[option.name], lambda option: option.label)


def _one_spelling_each(
    given: list[Option], where: Callable[[Option], _Given], label: Callable[[Option], str]
) -> None:
    """Raises ConfigError when two of ``given`` set one attribute (send and send-hex)."""
    by_attribute: dict[str, Option] = {}
    for option in given:
        other = by_attribute.setdefault(option.attribute, option)
        if other is not option:
            raise where(option).error(f"{label(other)} and {label(option)} are both given; use one")


def _check(
    pool: str, top: dict[str, _Given], given: _Given | None, document: Document | None
) -> CheckSpec:
    """The check of a pool: its ``check`` (true, false or a table) over the top level's."""
    table: dict[str, _Given] = {}  # by option name
    active = top[_ACTIVE.name].value if _ACTIVE.name in top else _ACTIVE.value(None)
    if given is not None:
        if isinstance(given.value, bool):
            active = given.value
        elif isinstance(given.value, dict):
            table = _check_table(pool, given.value, top, document)
            active = table.pop(_ACTIVE.name).value if _ACTIVE.name in table else True
        else:
            raise given.error(
                f"check takes true, false or a table: [pool.{pool}.check], not {given.value!r}"
            )
    for_type = table.get(_TYPE.name) or top.get(_TYPE.name)
    check_type = for_type.value if for_type else _TYPE.value(None)
    values: dict[str, Any] = {"active": active}
    for option in _CHECK_OPTIONS:
        if option.attribute in values or not _fits(option, check_type):
            continue
        same = [o for o in _CHECK_OPTIONS if o.attribute == option.attribute]
        chosen = next((table[o.name] for o in same if o.name in table), None) or next(
            (top[o.name] for o in same if o.name in top), None
        )
        values[option.attribute] = option.value(None) if chosen is None else chosen.value
    check = CheckSpec(**values)
    # What a check of its type cannot do without; where it belongs, as near as it is known.
    where = given or top.get(_TYPE.name) or _Given(None, "")
    if check.type == "agent" and check.port is None:
        raise where.error(f"pool {pool}: an agent check needs the port its agent answers on (port)")
    if check.type == "send-expect" and not (
        check.send or check.expect is not None or check.expect_regex is not None
    ):
        raise where.error(
            f"pool {pool}: a send-expect check needs something to send or expect (send, "
            "send-hex, expect, expect-hex or expect-regex)"
        )
    if check.type == "dns" and check.query is None:
        raise where.error(f"pool {pool}: a dns check needs the name it asks for (query)")
    if check.type == "redis" and check.username is not None and check.password is None:
        raise where.error(f"pool {pool}: a redis check with a username needs its password")
    return check


def _check_table(
    pool: str, raw: dict, top: dict[str, _Given], document: Document
) -> dict[str, _Given]:
    """The settings of a [pool.NAME.check] table, by option name, checked against its type
    (its own, else the top level's)."""
    section = f"[pool.{pool}.check]"

    def where(key: str) -> str:
        return document.where("pool", pool, "check", key)

    type_key = next((key for key in raw if key == _TYPE.table_key), None)
    if type_key is not None:
        check_type = config_file.parse(_TYPE, raw[type_key], where(type_key), type_key)
    else:
        check_type = top[_TYPE.name].value if _TYPE.name in top else _TYPE.value(None)
    table: dict[str, _Given] = {}
    keys: dict[str, str] = {}  # the key each option was given as
    for key, value in raw.items():
        option = _CHECK_BY_KEY.get(key.replace("_", "-"))
        if option is None:
            named = config_file.option(key)
            hint = f"; write {named.table_key}" if named and named.scope == CHECK else ""
            raise ConfigError(
                f"{where(key)}: unknown key {key!r} in {section}{hint} (a check of type "
                f"{check_type} takes: {', '.join(check_keys(check_type))})"
            )
        if not _fits(option, check_type):
            raise ConfigError(
                f"{where(key)}: {key} is for {_for_types(option)}, and {section} has type "
                f"{check_type}"
            )
        if option.name in table:
            raise ConfigError(f"{where(key)}: {key} is set twice")
        table[option.name] = _Given(config_file.parse(option, value, where(key), key), where(key))
        keys[option.name] = key
    given = [settings.OPTIONS_BY_NAME[name] for name in table]  # in the file's order
    _one_spelling_each(given, lambda option: table[option.name], lambda option: keys[option.name])
    return table


# ---- what check prints, and the open-file limit ------------------------------------------------


def describe(config: Config) -> list[str]:
    """The lines ``fastlb check`` prints: the process settings, then every frontend and pool
    with every setting it resolved to (one line per address, route and backend; for a pool's
    check, ``check.KEY`` lines of the settings its type uses)."""
    lines = _aligned(
        "", [row for o in _scoped(PROCESS) for row in _rows(o, getattr(config, o.name))]
    )
    for frontend in config.frontends:
        options = _scoped(FRONTEND)
        rows = _rows(options[0], frontend.listen)  # listen first
        rows.append(("pool", frontend.pool))
        rows += [("sni", f"{r.pattern} -> {r.pool}") for r in frontend.sni] or [("sni", "off")]
        rows.append(("sni-required", "on" if frontend.sni_required else "off"))
        rows += [row for o in options[1:] for row in _rows(o, getattr(frontend, o.name))]
        lines += _aligned(f"frontend {frontend.name}: ", rows)
    for pool in config.pools:
        rows = [row for o in _scoped(POOL) for row in _rows(o, getattr(pool, o.name))]
        lines += _aligned(f"pool {pool.name}: ", rows + _check_rows(pool.check))
    return lines


def _check_rows(check: CheckSpec) -> list[tuple[str, str]]:
    """``check.KEY`` and value for each setting of a check that its type uses."""
    rows = []
    shown = set()
    for option in _CHECK_OPTIONS:
        if option.attribute in shown or not _fits(option, check.type):
            continue
        if option.attribute in ("flap_base", "flap_max") and not check.flap_window:
            continue  # no flap damping
        shown.add(option.attribute)
        rows.append((f"check.{option.table_key}", option.show(getattr(check, option.attribute))))
    return rows


def _rows(option: Option, value: Any) -> list[tuple[str, str]]:
    if option.many:
        return [(option.key, option.show(item)) for item in value] or [(option.key, "off")]
    return [(option.key, option.show(value))]


def _aligned(prefix: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(key) for key, _ in rows)
    return [f"{prefix}{key:<{width}} = {value}" for key, value in rows]


def fit_to_open_file_limit(config: Config, limit: int) -> tuple[Config, str | None]:
    """Lowers every frontend's max_conn in proportion so that two descriptors per connection of
    all of them fit in ``limit`` (each keeps at least 1); returns the configuration and, when it
    had to, a message saying so."""
    most = settings.max_connections(limit)
    total = config.max_conn
    if total <= most:
        return config, None
    frontends = tuple(
        dataclasses.replace(frontend, max_conn=max(1, frontend.max_conn * most // total))
        if frontend.protocol == "tcp"
        else frontend
        for frontend in config.frontends
    )
    why = f"to fit the open-file limit ({limit}; raise it with ulimit -n or LimitNOFILE=)"
    if len(frontends) == 1:
        message = f"--max-conn lowered from {total} to {frontends[0].max_conn} {why}"
    else:
        changes = ", ".join(
            f"frontend {old.name} from {old.max_conn} to {new.max_conn}"
            for old, new in zip(config.frontends, frontends, strict=True)
            if old.max_conn != new.max_conn
        )
        message = f"max-conn lowered {why}: {changes}"
    return dataclasses.replace(config, frontends=frontends), message
