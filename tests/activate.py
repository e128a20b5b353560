"""Plays systemd's socket activation: ``activate.py FD,FD,... -- COMMAND...`` moves the listening
sockets FD... to 3, 4, ..., sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own pid, which
the command keeps) and executes COMMAND, as systemd does for a service with a .socket unit."""

import fcntl
import os
import sys

fds = [int(fd) for fd in sys.argv[1].split(",")]
command = sys.argv[sys.argv.index("--") + 1 :]
base = 3 + len(fds)
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i, inheritable=True)
os.environ.update(
    LISTEN_FDS=str(len(fds)),
    LISTEN_FDNAMES=":".join(["fastlb.socket"] * len(fds)),
    LISTEN_PID=str(os.getpid()),
)
os.execvp(command[0], command)
