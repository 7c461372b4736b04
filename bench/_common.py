"""What every benchmark records about the machine its numbers came from."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    """CPU, threads, versions and the load when the bench started (a loaded machine is slower)."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # the vector kernels torch picked (AVX2, AVX512...): machines that differ here round
        # differently, and a perplexity in the hundreds can move by a tenth from that alone
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
    }


def proc_status_bytes(key: str) -> int:
    """A memory line of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def write_results(path: Path, *, info: dict, args, skip: tuple[str, ...] = (), **sections) -> None:
    """One JSON per bench: the machine, the arguments that made it, then its sections."""
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in skip
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "args": settings, **sections}, indent=1))


def add_quality_arguments(parser, results: Path) -> None:
    """What the quality benches share: calibration and evaluation sizes, seed, output folder."""
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=results)
