"""Errors a user can act on, and the exit codes of the ``fastlb`` command.

A :class:`FastlbError` reaches the user as one line, ``fastlb: error: <message>``, never as a
traceback; its ``exit_code`` says what kind of failure it was.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FORCED = 1  # stopped at once by a second stop signal, or an unexpected failure
EXIT_USAGE = 2  # bad flags or addresses, a port that cannot be bound
EXIT_BOOT_FAILED = 3  # a worker could not start: respawning it would only loop
EXIT_UNREACHABLE = 4  # fastlb check: a backend did not accept a TCP connection


class FastlbError(Exception):
    """A failure the user can fix; the message is one line without a traceback."""

    exit_code = EXIT_FORCED


class ConfigError(FastlbError):
    """A flag, address or port that cannot be used."""

    exit_code = EXIT_USAGE
