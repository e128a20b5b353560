"""Backend health: the rise/fall state machine (no I/O) and the TCP probes that feed it."""
