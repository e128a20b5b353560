"""Pure-Python reference models of the deterministic algorithms, for the differential tests.

Written from the algorithm descriptions, independently of the Cython code, and slow on purpose
(no tricks): the tests check that the compiled data plane picks exactly what these pick. Never
imported by fastlb itself.
"""

import bisect
import ipaddress
import math
import socket
from dataclasses import dataclass

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
RING_VNODES = 160
RING_MAX_POINTS = 1 << 18
MAGLEV_SIZE = 65537
MAGLEV_SIZE_LARGE = 655373
MAGLEV_OFFSET_SEED = 0x6F66667365746F66
MAGLEV_SKIP_SEED = 0x736B69707370696B


def mix64(x: int) -> int:
    x &= MASK
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    x ^= x >> 33
    return x


def hash_bytes(data: bytes, seed: int) -> int:
    h = 0xCBF29CE484222325 ^ seed
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & MASK
    return mix64(h)


def sockaddr(host: str, port: int) -> bytes:
    """The bytes of a zeroed struct sockaddr_in / sockaddr_in6 on little-endian Linux."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + ip.packed + bytes(8)
    return (
        socket.AF_INET6.to_bytes(2, "little")
        + port.to_bytes(2, "big")
        + bytes(4)
        + ip.packed
        + bytes(4)
    )


def backend_id(host: str, port: int) -> int:
    return hash_bytes(sockaddr(host, port), 0x5EED)


def hash_client(host: str, port: int = 0, with_port: bool = False) -> int:
    ip = ipaddress.ip_address(host)
    h = hash_bytes(ip.packed, 4 if ip.version == 4 else 6)
    if with_port:
        # sin_port is stored in network order and read as a native (little-endian) integer
        h = mix64(h ^ int.from_bytes(port.to_bytes(2, "big"), "little"))
    return h


@dataclass(frozen=True)
class Backend:
    host: str
    port: int
    weight: int
    up: bool = True
    backup: bool = False

    @property
    def id(self) -> int:
        return backend_id(self.host, self.port)


def backends(rows) -> list[Backend]:
    return [Backend(*row) for row in rows]


def eligible(table: list[Backend]) -> list[int]:
    """Up primaries, else up backups, else every primary."""
    for wanted in (
        lambda b: b.up and not b.backup,
        lambda b: b.up and b.backup,
        lambda b: not b.backup,
    ):
        chosen = [i for i, b in enumerate(table) if wanted(b)]
        if chosen:
            return chosen
    return []


def base(table: list[Backend]) -> list[int]:
    """What the hashing algorithms build over: every primary while the eligible backends are
    primaries holding at least half the primaries' weight (health changes leave the build as
    it is; the walk passes over the backends not in use), else the eligible backends. Only
    those with a positive weight."""
    chosen = eligible(table)
    primaries = [i for i, b in enumerate(table) if not b.backup]
    weight_in_use = sum(table[i].weight for i in chosen)
    if chosen and not table[chosen[0]].backup:
        if weight_in_use * 2 >= sum(table[i].weight for i in primaries):
            chosen = primaries
    if weight_in_use <= 0:
        return []
    return [i for i in chosen if table[i].weight > 0]


class Walker:
    """The forward walk over a candidate list (ring points, Maglev entries), with bounded loads;
    it passes over the backends not in use."""

    def __init__(self, table: list[Backend], owners: list[int], balance_factor: float = 0.0):
        self.table = table
        self.owners = owners
        self.factor = balance_factor
        self.eligible = eligible(table)

    def walk(self, start: int, tried=(), active=None) -> int:
        untried = [i for i in self.eligible if self.table[i].weight > 0 and i not in tried]
        if not self.owners or not untried:
            return -1
        cap = None
        if self.factor > 0:
            active = active or [0] * len(self.table)
            total = sum(active[i] for i in self.eligible)
            weight = sum(self.table[i].weight for i in self.eligible)
            load = max(self.factor, 1.0) * (total + 1)

            def cap(i):
                return math.ceil(load * self.table[i].weight / weight)

        fallback = -1
        size = len(self.owners)
        in_use = set(self.eligible)
        for step in range(size):
            i = self.owners[(start + step) % size]
            if i not in in_use or i in tried:
                continue
            if cap is None or active[i] < cap(i):
                return i
            if fallback < 0:
                fallback = i
        return fallback


class Ring(Walker):
    """consistent: ketama-style ring, RING_VNODES points per gcd-reduced unit of weight."""

    def __init__(self, rows, balance_factor: float = 0.0):
        table = backends(rows)
        live = base(table)
        unit = math.gcd(*(table[i].weight for i in live)) if live else 1
        units = sum(table[i].weight // unit for i in live)
        points = []
        for i in live:
            b = table[i]
            w = b.weight // unit
            if RING_VNODES * units <= RING_MAX_POINTS:
                count = RING_VNODES * w
            else:
                count = max(1, w * RING_MAX_POINTS // units)
            for k in range(count):
                points.append((mix64(b.id + (k + 1) * GOLDEN), b.id, i))
        points.sort()
        self.positions = [p[0] for p in points]
        super().__init__(table, [p[2] for p in points], balance_factor)

    def pick(self, key: int, tried=(), active=None) -> int:
        if not self.owners:
            return -1
        first = bisect.bisect_left(self.positions, key)  # first point at or after the key
        return self.walk(first % len(self.positions), tried, active)


class Maglev(Walker):
    """maglev: the NSDI 2016 population loop, backends taking turns in address-hash order."""

    def __init__(self, rows, balance_factor: float = 0.0):
        table = backends(rows)
        live = sorted((table[i].id, i) for i in base(table))
        entries: list[int] = []
        if live:
            size = MAGLEV_SIZE if len(live) * 100 <= MAGLEV_SIZE else MAGLEV_SIZE_LARGE
            entries = [-1] * size
            offset = {i: mix64(bid ^ MAGLEV_OFFSET_SEED) % size for bid, i in live}
            skip = {i: mix64(bid ^ MAGLEV_SKIP_SEED) % (size - 1) + 1 for bid, i in live}
            taken = {i: 0 for _, i in live}  # j: how far along its permutation a backend is
            turns = {i: 0 for _, i in live}  # turns taken so far
            wmax = max(table[i].weight for _, i in live)
            filled = 0
            rnd = 0
            while filled < size:
                for _, i in live:
                    # a backend of weight w takes its k-th turn in the first round r with
                    # r * w >= k * wmax
                    if rnd * table[i].weight < turns[i] * wmax:
                        continue
                    turns[i] += 1
                    while True:
                        slot = (offset[i] + taken[i] * skip[i]) % size
                        taken[i] += 1
                        if entries[slot] < 0:
                            break
                    entries[slot] = i
                    filled += 1
                    if filled == size:
                        break
                rnd += 1
        super().__init__(table, entries, balance_factor)

    def pick(self, key: int, tried=(), active=None) -> int:
        if not self.owners:
            return -1
        return self.walk(key % len(self.owners), tried, active)


class SmoothRoundRobin:
    """roundrobin: nginx's smooth weighted round robin. A retry (some backends tried) takes the
    untried backend that would score highest, charging no one."""

    def __init__(self, rows):
        self.table = backends(rows)
        self.eligible = eligible(self.table)
        self.current = [0] * len(self.table)

    def pick(self, key: int = 0, tried=()) -> int:
        candidates = [i for i in self.eligible if self.table[i].weight > 0]
        if tried:
            untried = [i for i in candidates if i not in tried]
            if not untried:
                return -1
            return max(untried, key=lambda i: (self.current[i] + self.table[i].weight, -i))
        if not candidates:
            return -1
        for i in candidates:
            self.current[i] += self.table[i].weight
        best = max(candidates, key=lambda i: (self.current[i], -i))
        self.current[best] -= sum(self.table[i].weight for i in candidates)
        return best


MODELS = {
    "roundrobin": SmoothRoundRobin,
    "consistent": Ring,
    "maglev": Maglev,
    "iphash": Ring,  # iphash is consistent under another name
}
