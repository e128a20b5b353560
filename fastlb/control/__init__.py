"""The runtime control API: the verbs of ``fastlb ctl`` (no I/O) and its unix socket."""
