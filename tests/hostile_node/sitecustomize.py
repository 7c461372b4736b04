"""Makes a SuperNode hostile, for the loopback test of a hostile organisation.

On ``PYTHONPATH`` of one SuperNode only (its ClientApp processes inherit it), with
``FEDSPALLM_HOSTILE`` naming the attack. Nothing here is part of the project: it patches
the real ClientApp as it is imported, the way an organisation that runs modified code would.

- ``lying-array``: the payload Array declares uint8 bytes that are no ``.npy`` at all;
- ``scale:<f>``: every kept value multiplied by ``f`` (``scale:1e30``, ``scale:1000``);
- ``sign-flip``: every kept value negated;
- ``keep-all``: masks that keep every entry.
"""

import importlib.abc
import importlib.util
import os
import sys

ATTACK = os.environ.get("FEDSPALLM_HOSTILE", "")


def _poison_task(module) -> None:
    import torch

    from fedspallm_strategy.wire.payload import encode

    honest = module.encode_pruned

    def encode_pruned(model, masks, config):
        if ATTACK in ("lying-array", ""):
            return honest(model, masks, config)
        weights = dict(model.named_parameters())
        values = {n: weights[n].data for n in masks}
        if ATTACK.startswith("scale:"):
            factor = float(ATTACK.split(":")[1])
            return encode({n: v * factor for n, v in values.items()}, masks)
        if ATTACK == "sign-flip":
            return encode({n: -v for n, v in values.items()}, masks)
        if ATTACK == "keep-all":
            return encode(values, {n: torch.ones_like(m) for n, m in masks.items()})
        raise ValueError(f"unknown FEDSPALLM_HOSTILE attack {ATTACK!r}")

    module.encode_pruned = encode_pruned


def _poison_wire(module) -> None:
    if ATTACK != "lying-array":
        return
    from flwr.app import Array

    def lying_array(ndarray):  # what bytes_record wraps a reply's payload in
        return Array("uint8", (len(ndarray),), "numpy.ndarray", b"\x00not a .npy" * 8)

    module.Array = lying_array


PATCHES = {"client_app.task": _poison_task, "fedspallm_strategy.wire.protocol": _poison_wire}


class _Patcher(importlib.abc.MetaPathFinder):
    """Finds the real module, and patches it right after it runs."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module, run=run):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if ATTACK:
    sys.meta_path.insert(0, _Patcher())
