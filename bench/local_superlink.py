"""The local SuperLink that `flwr run .` starts: find it, and stop it by PID.

`flwr run` against a local simulation federation starts a detached SuperLink (and Ray under
it) that keeps running after the run and that no flwr command stops. The bench and the tests
give every run a private ``FLWR_HOME``, which appears on those processes' command lines, and
stop exactly the processes that mention it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def superlink_running() -> bool:
    """Whether some local SuperLink is up (a `flwr run` would then use it, not start its own)."""
    from flwr.cli.local_superlink import _is_local_superlink_started

    return _is_local_superlink_started()


def processes_mentioning(text: str) -> list[int]:
    """PIDs of the processes, this one excepted, whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # the process ended while we looked
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def stop_local_superlink(home: Path, grace_s: float = 30) -> list[int]:
    """Stop what `flwr run` started under ``home``: SIGTERM to each process group, then SIGKILL.

    Returns the PIDs found at first.
    """
    pids = processes_mentioning(str(home))
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)  # the detached SuperLink's own session
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_mentioning(str(home)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
