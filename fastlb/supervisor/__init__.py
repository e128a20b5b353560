"""The supervisor: listening sockets, the worker processes and their messages, systemd."""
