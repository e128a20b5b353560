"""Backend health: the rise/fall state machine (no I/O) and the probes that feed it (tcp, http,
send-expect, redis, postgres, mysql, tls and agent checks, in the supervisor's selectors loop)."""
