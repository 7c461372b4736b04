"""Freed tensor memory goes back to the system (``fedspallm_strategy/run/allocator.py``).

Each case runs in a fresh interpreter, since the allocator setting is per process and lasts.
The pattern is a layer walk in small: 40 tensors of 7 MiB, every other one freed. With glibc's
default (a threshold raised to 7 MiB by one freed mapped block) they come from the heap and the
20 freed ones stay in it as holes: about 140 MiB the process keeps though nothing holds it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest


def _glibc() -> bool:
    return sys.platform.startswith("linux") and hasattr(
        ctypes.CDLL("libc.so.6"), "gnu_get_libc_version"
    )


pytestmark = pytest.mark.skipif(not _glibc(), reason="the setting is glibc's")

MIB = 2**20
SCRIPT = """
import sys, torch
from fedspallm_strategy.run.allocator import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory() and return_freed_memory()  # a second call is a no-op
def anon():
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024
first = torch.ones(7 * 2**20, dtype=torch.uint8)
del first  # freeing a mapped 7 MiB block raises glibc's threshold past it
before = anon()
blocks = [torch.ones(7 * 2**20, dtype=torch.uint8) for _ in range(40)]
for index in range(0, 40, 2):
    blocks[index] = None
print(anon() - before)
"""


def retained(mode: str) -> int:
    """RSS growth beyond the 20 live blocks, in bytes."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1]) - 20 * 7 * MIB


def test_the_default_heap_keeps_freed_blocks():
    # The defect the setting exists for; if glibc ever stops doing this, this test says so.
    assert retained("default") > 100 * MIB


def test_fixed_threshold_returns_freed_blocks():
    assert retained("fixed") < 16 * MIB


def test_a_users_own_setting_is_left_alone():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * MIB)}
    script = "from fedspallm_strategy.run.allocator import return_freed_memory as r; print(r())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.stdout.split()[-1] == "False"
