"""Make freed tensor memory go back to the system, so a role's RSS follows what it holds.

On Linux, torch's CPU tensors come from glibc's ``malloc``. glibc serves a block below its
mmap threshold from heaps that it rarely hands back, and it raises that threshold (up to
32 MiB) each time a larger mapped block is freed. A role that walks a model layer by layer
frees a layer's tensors every round and allocates slightly different sizes the next, so the
freed blocks stay in its heaps as holes: its RSS grows with every layer though its live
tensors do not. Seen on a 16-layer 1B model, one layer a round, the server and two synthesised
clients in one process: live tensors flat, RSS up about 45 MB a round, peak 3.3 GiB; with the
threshold fixed at 1 MiB, peak 2.2 GiB, the RSS growing only by the masks the server keeps.
Every block of 1 MiB or more is then its own mapping, returned when freed.

A user's own ``MALLOC_MMAP_THRESHOLD_`` (glibc's variable for the same setting) is left as set.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20
_ENVIRONMENT_SETTING = "MALLOC_MMAP_THRESHOLD_"

_done = False


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process, once; whether it was set.

    Does nothing (``False``) off Linux, on a C library other than glibc, or where the
    environment already sets the threshold.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or _ENVIRONMENT_SETTING in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return False
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not _done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay in the heap")
    return _done
