"""The verbs of ``fastlb ctl``, and the runtime state they change: pure, no I/O.

A request is one JSON object, ``{"verb": VERB, "args": [TEXT, ...]}``; :func:`parse` turns it
into a :class:`Command` or raises :class:`CommandError` with a one-line reason. The operator's
changes live in a :class:`Runtime`, keyed by (pool name, backend address), apart from the
configuration and apart from what a backend's agent check says:

- ``admin``: ``"drain"`` (no new connections, open ones finish) or ``"disable"`` (maintenance:
  no traffic, no checks); the operator's word wins over the agent's drain or maint.
- ``weight``: the runtime weight, kept while the configured weight stays the one it was set
  against (``config_weight``); a config that changes that backend's weight wins.
- ``added``: a backend ``ctl add`` put in a pool the config does not list it in.
- ``removed``: ``"pending"`` while a removed backend's open connections finish, ``"done"``
  after (a backend the config lists stays out until ``ctl add`` brings it back).
- ``health``: ``"down"`` for a backend last seen down, so that a restart does not send it
  traffic before its checks pass.

:meth:`Runtime.reconcile` makes the runtime agree with a (new) config, by these rules: a pool
the config no longer has drops its entries; a backend neither in the config nor added drops its
entry; an added backend the config now lists belongs to the config from then on; a pending
removal found at start is done (nothing is open on a new process).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from fastlb.model import Address, BackendSpec, Config, PoolSpec

MAX_WEIGHT = 1_000_000  # as fastlb.settings.MAX_WEIGHT (which imports the data plane)
STATE_VERSION = 1

# verb -> (what its arguments look like, what it does)
VERBS = {
    "show": ("[POOL]", "frontends, pools and backends with state, weights, counts and health"),
    "drain": ("POOL/ADDR", "no new connections; open ones finish"),
    "disable": ("POOL/ADDR", "maintenance: no traffic, no checks"),
    "enable": ("POOL/ADDR", "undo drain, disable or a pending remove"),
    "weight": ("POOL/ADDR N", "set the runtime weight (0 to 1000000)"),
    "add": ("POOL ADDR[,weight=N][,backup]", "add a backend to a pool"),
    "remove": ("POOL/ADDR", "drain, then forget the backend once its last connection closed"),
    "kill-sessions": ("POOL/ADDR", "reset every open connection to the backend now"),
    "reload": ("", "read the config file again, as SIGHUP does"),
}
ARG_COUNTS = {
    "show": (0, 1),
    "drain": (1, 1),
    "disable": (1, 1),
    "enable": (1, 1),
    "weight": (2, 2),
    "add": (2, 2),
    "remove": (1, 1),
    "kill-sessions": (1, 1),
    "reload": (0, 0),
}
ADMIN_STATES = ("drain", "disable")


class CommandError(Exception):
    """A request that cannot be carried out; the message is one line for the operator."""


@dataclass(frozen=True)
class Command:
    verb: str
    pool: str | None = None
    address: Address | None = None
    weight: int | None = None
    spec: BackendSpec | None = None  # add: the new backend


def parse_address(text: str) -> Address:
    """A numeric HOST:PORT or [IPV6]:PORT, as the running balancer names its backends."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise CommandError(f"{text}: expected [IPV6]:PORT")
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise CommandError(f"{text}: expected HOST:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise CommandError(f"{text}: the host must be a numeric IP address") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CommandError(f"{text}: the port must be a number from 1 to 65535")
    return Address(str(ip), int(port))


def parse_weight(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_WEIGHT:
        raise CommandError(f"weight {text}: expected a whole number from 0 to {MAX_WEIGHT}")
    return int(text)


def parse_target(text: str) -> tuple[str, Address]:
    pool, slash, address = text.partition("/")
    if not slash or not pool:
        raise CommandError(f"{text}: expected POOL/ADDR, as in default/127.0.0.1:8080")
    return pool, parse_address(address)


def parse_backend(text: str) -> BackendSpec:
    """ADDR[,weight=N][,backup], as in the config."""
    address, *extras = text.split(",")
    weight, backup = 1, False
    for extra in extras:
        key, equals, value = extra.partition("=")
        if key == "weight" and equals:
            weight = parse_weight(value)
        elif extra == "backup":
            backup = True
        else:
            raise CommandError(f"unknown backend option {extra!r} (expected weight=N or backup)")
    return BackendSpec(parse_address(address), weight, backup)


def parse(request: object) -> Command:
    """The command a decoded request asks for."""
    if not isinstance(request, dict):
        raise CommandError("a request is a JSON object with verb and args")
    verb, args = request.get("verb"), request.get("args", [])
    if not isinstance(verb, str) or verb not in VERBS:
        raise CommandError(f"unknown verb {verb!r} (choose from {', '.join(VERBS)})")
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise CommandError("args must be a list of strings")
    low, high = ARG_COUNTS[verb]
    if not low <= len(args) <= high:
        usage = f"{verb} {VERBS[verb][0]}".strip()
        raise CommandError(f"usage: {usage}")
    if verb == "show":
        return Command(verb, pool=args[0] if args else None)
    if verb == "reload":
        return Command(verb)
    if verb == "add":
        return Command(verb, pool=args[0], spec=parse_backend(args[1]))
    pool, address = parse_target(args[0])
    weight = parse_weight(args[1]) if verb == "weight" else None
    return Command(verb, pool=pool, address=address, weight=weight)


# ---- the runtime state ---------------------------------------------------------------------------


@dataclass
class Override:
    """What the operator changed about one backend, and its last known health."""

    admin: str | None = None  # "drain" or "disable"
    weight: int | None = None
    config_weight: int | None = None  # the configured weight when weight was set
    added: BackendSpec | None = None  # not in the config: ctl add put it there
    removed: str | None = None  # "pending" or "done"
    health: str | None = None  # "down": last seen down

    @property
    def empty(self) -> bool:
        return self == Override()


Key = tuple[str, Address]


@dataclass
class Runtime:
    overrides: dict[Key, Override] = field(default_factory=dict)

    def get(self, pool: str, address: Address) -> Override:
        return self.overrides.get((pool, address)) or Override()

    def _set(self, key: Key, override: Override) -> None:
        if override.empty:
            self.overrides.pop(key, None)
        else:
            self.overrides[key] = override

    def apply(self, command: Command, present: Mapping[str, Mapping[Address, BackendSpec]]) -> str:
        """Changes the state as a drain, disable, enable, weight, add or remove asks; returns
        what was done, in words. ``present`` is every pool's backends as they are now (those
        being removed included), with their configured specs."""
        if command.pool not in present:
            raise CommandError(f"no pool {command.pool!r} (pools: {', '.join(present)})")
        backends = present[command.pool]
        if command.verb == "add":
            spec = command.spec
            key = (command.pool, spec.address)
            override = self.get(*key)
            if spec.address in backends and override.removed is None:
                raise CommandError(f"{command.pool}/{spec.address} is already in the pool")
            if override.removed is not None and override.added is None:
                # A backend the config lists, removed earlier: back as the config has it.
                self._set(key, replace(override, removed=None, admin=None))
                return f"{command.pool}/{spec.address} is back in the pool"
            self._set(key, Override(added=spec))
            return f"{command.pool}/{spec} added"
        key = (command.pool, command.address)
        where = f"{command.pool}/{command.address}"
        override = self.get(*key)
        if command.address not in backends or override.removed == "done":
            raise CommandError(f"no backend {command.address} in pool {command.pool}")
        if command.verb in ("drain", "disable"):
            self._set(key, replace(override, admin=command.verb))
            return f"{where} is {'draining' if command.verb == 'drain' else 'disabled'}"
        if command.verb == "enable":
            self._set(key, replace(override, admin=None, removed=None))
            return f"{where} is enabled"
        if command.verb == "weight":
            configured = backends[command.address].weight
            self._set(key, replace(override, weight=command.weight, config_weight=configured))
            return f"{where} has weight {command.weight}"
        if command.verb == "remove":
            self._set(key, replace(override, removed="pending"))
            return f"{where} is being removed: it drains, and goes once its last connection closed"
        raise CommandError(f"{command.verb} changes no runtime state")

    def removal_done(self, pool: str, address: Address) -> None:
        """A removed backend's last connection closed: an added one is forgotten."""
        key = (pool, address)
        override = self.get(*key)
        if override.added is not None:
            self.overrides.pop(key, None)
        else:
            self._set(key, Override(removed="done"))

    def set_health(self, pool: str, address: Address, up: bool) -> bool:
        """Records a backend's health; returns whether the journal changed."""
        key = (pool, address)
        override = self.get(*key)
        health = None if up else "down"
        if override.health == health:
            return False
        self._set(key, replace(override, health=health))
        return True

    def weight(self, pool: str, spec: BackendSpec) -> int:
        """The weight the operator set, else the configured one."""
        override = self.get(pool, spec.address)
        return spec.weight if override.weight is None else override.weight

    def specs(self, pool: PoolSpec) -> tuple[BackendSpec, ...]:
        """A pool's backends as the operator made them: the config's, then the added ones; those
        whose removal is done are left out."""
        listed = [
            spec for spec in pool.backends if self.get(pool.name, spec.address).removed != "done"
        ]
        known = {spec.address for spec in pool.backends}
        added = [
            override.added
            for (name, address), override in self.overrides.items()
            if name == pool.name
            and override.added is not None
            and address not in known
            and override.removed != "done"
        ]
        return tuple(listed + added)

    def reconcile(self, config: Config, starting: bool = False) -> list[str]:
        """Makes the state agree with ``config`` (see the module's rules); returns what it
        dropped or changed, one line each, for the log."""
        notes = []
        pools = {pool.name: {spec.address: spec for spec in pool.backends} for pool in config.pools}
        for key, override in list(self.overrides.items()):
            name, address = key
            where = f"{name}/{address}"
            if name not in pools:
                del self.overrides[key]
                notes.append(
                    f"{where}: its pool is not in the config; its runtime state is dropped"
                )
                continue
            listed = pools[name].get(address)
            if listed is None and override.added is None:
                del self.overrides[key]
                if override.removed != "done":
                    notes.append(f"{where}: not in the config; its runtime state is dropped")
                continue
            if listed is not None and override.added is not None:
                notes.append(f"{where}: added at run time, now in the config, which owns it")
                override = replace(override, added=None)
            if (
                listed is not None
                and override.weight is not None
                and override.config_weight != listed.weight
            ):
                notes.append(
                    f"{where}: the config changed its weight; the runtime weight is dropped"
                )
                override = replace(override, weight=None, config_weight=None)
            if starting and override.removed == "pending":
                override = replace(override, removed="done")
            if override.removed == "done" and override.added is not None:
                override = Override()
            self._set(key, override)
        return notes

    # ---- the journal's JSON ----------------------------------------------------------------------

    def to_json(self) -> dict:
        entries = []
        for (pool, address), override in sorted(
            self.overrides.items(), key=lambda item: (item[0][0], str(item[0][1]))
        ):
            entry = {"pool": pool, "address": str(address)}
            for name in ("admin", "weight", "config_weight", "removed", "health"):
                value = getattr(override, name)
                if value is not None:
                    entry[name] = value
            if override.added is not None:
                entry["added"] = {"weight": override.added.weight, "backup": override.added.backup}
            entries.append(entry)
        return {"version": STATE_VERSION, "backends": entries}

    @classmethod
    def from_json(cls, document: object) -> Runtime:
        """The state a journal holds; CommandError names the first thing wrong with it."""
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise CommandError(f"not a version {STATE_VERSION} fastlb state file")
        entries = document.get("backends")
        if not isinstance(entries, list):
            raise CommandError("backends must be a list")
        runtime = cls()
        for i, entry in enumerate(entries):
            try:
                key, override = _entry(entry)
            except (CommandError, KeyError, TypeError, ValueError) as exc:
                raise CommandError(f"backends[{i}]: {exc}") from None
            runtime.overrides[key] = override
        return runtime


def _entry(entry: dict) -> tuple[Key, Override]:
    address = parse_address(entry["address"])
    pool = entry["pool"]
    if not isinstance(pool, str):
        raise CommandError("pool must be a string")
    choices = {"admin": ADMIN_STATES, "removed": ("pending", "done"), "health": ("down",)}
    values = {}
    for name, allowed in choices.items():
        value = entry.get(name)
        if value is not None and value not in allowed:
            raise CommandError(f"{name} must be one of {', '.join(allowed)}")
        values[name] = value
    for name in ("weight", "config_weight"):
        value = entry.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise CommandError(f"{name} must be a whole number")
            parse_weight(str(value))
        values[name] = value
    added = entry.get("added")
    if added is not None:
        weight, backup = added["weight"], added.get("backup", False)
        if not isinstance(backup, bool):
            raise CommandError("added.backup must be true or false")
        added = BackendSpec(address, parse_weight(str(weight)), backup)
    return (pool, address), Override(added=added, **values)


# ---- no silent outage ----------------------------------------------------------------------------


def unusable_pools(pools: Iterable[tuple[str, Iterable[tuple[int, bool]]]]) -> dict[str, str]:
    """A line for each pool, by name, that no backend can take a connection in: every backend
    has weight 0, or is disabled, draining or removed. ``pools`` gives each pool's name and,
    per backend, its weight and whether the operator left it in service. Health is not
    counted: down backends are a different (logged) failure."""
    problems = {}
    for name, backends in pools:
        backends = list(backends)
        if any(weight > 0 and in_service for weight, in_service in backends):
            continue
        if not backends:
            why = "it has no backends"
        elif all(not in_service for _, in_service in backends):
            why = "every backend is disabled, draining or removed"
        elif all(weight == 0 for weight, _ in backends):
            why = "every backend has weight 0"
        else:
            why = "every backend has weight 0 or is disabled, draining or removed"
        problems[name] = f"pool {name} has no usable backend: {why}; its clients will be refused"
    return problems


def config_pools(config: Config, runtime: Runtime | None = None) -> list[tuple[str, list]]:
    """The argument of :func:`unusable_pools` for a config (and a journal's runtime state)."""
    runtime = runtime or Runtime()
    return [
        (
            pool.name,
            [
                (
                    runtime.weight(pool.name, spec),
                    runtime.get(pool.name, spec.address).admin is None
                    and runtime.get(pool.name, spec.address).removed is None,
                )
                for spec in runtime.specs(pool)
            ],
        )
        for pool in config.pools
    ]
