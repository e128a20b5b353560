# iphash: another name for consistent, the ketama-style hash ring of the client address (see
# consistent.pxi). It was weighted rendezvous hashing, whose pick scores every backend; the ring
# keeps what iphash promised (every worker and every fastlb instance agrees, and when a backend
# leaves or returns only its own clients move, shares follow the weights) at one bucket of
# ring points read per pick. hash-balance-factor applies to it as to consistent. Called without the GIL; touches
# no Python objects.

cdef Algorithm IPHASH
IPHASH.name = b"iphash"
IPHASH.needs = NEEDS_CLIENT_KEY
IPHASH.build = consistent_build
IPHASH.release = consistent_release
IPHASH.pick = consistent_pick
IPHASH.counts_changed = no_counts
IPHASH.adopted = no_adopted
IPHASH.slow_build = True
register_algorithm(&IPHASH)
