"""Speed of the client-side engine, and our SparseGPT against the published reference.

For each pruner (SparseGPT, Wanda) the bench walks the first ``--layers`` decoder layers of
the model exactly as ``llm_pruning.engine.prune_model`` does (capture the inputs of layer 0,
then per layer: statistics forward, prune, forward to the next layer), through the public
``LayerwiseCalibrator`` building blocks, and reports per layer and in total the time of the
calibration forwards (``capture`` / ``statistics`` / ``forward`` from its ``timings``) and of
pruning (each matrix's ``Pruner.prune`` call, timed one by one).

With ``--reference PATH`` (a local checkout of github.com/IST-DASLab/sparsegpt; only its
``sparsegpt.py`` and ``quant.py`` are used, imported from PATH, never copied here) every
SparseGPT matrix is also pruned by the reference ``SparseGPT.fasterprune`` on the SAME inputs:
before our pruning step, one more forward of the still-dense layer over the same calibration
activations feeds the reference's ``add_batch(inp, out)`` per segment (as its ``llama.py``
does), on a copy of each Linear. Both results are then scored with the reconstruction error
``||W X - W_hat X||_F^2`` on the calibration inputs ``X``, computed exactly from our Hessian
sum ``H = sum x^T x`` as ``tr((W - W_hat) H (W - W_hat)^T)`` (float64). The model continues
with OUR pruned layer, so the next layer's inputs are the engine's. The reference's extra
forward is not counted in our timings. The reference's time is that of its whole
``fasterprune`` call as published (it also sums a loss estimate and prints two lines, which
the bench captures); ours is the whole ``Pruner.prune`` call.

The machine may be shared: per matrix, both pruners run ``--timing-repeats`` times,
alternating, and the table shows each one's minimum (every time is in the JSON).

    git clone https://github.com/IST-DASLab/sparsegpt /tmp/ref_sparsegpt     # outside the repo
    python bench/engine_speed.py --reference /tmp/ref_sparsegpt            # all 30 layers
    python bench/engine_speed.py --layers 2 --reference /tmp/ref_sparsegpt  # a quick look
    python bench/engine_speed.py --layers 2 --pattern 2:4 --reference /tmp/ref_sparsegpt
    python bench/engine_speed.py --layers 2 --reference /tmp/ref_sparsegpt \\
        --shapes 576x576,1536x576,576x1536,2048x2048        # plus random matrices of these shapes

Writes bench/results/engine_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from _common import machine, write_results  # noqa: E402

from llm_pruning.data import calibration_segments  # noqa: E402
from llm_pruning.engine import LayerwiseCalibrator  # noqa: E402
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model  # noqa: E402
from llm_pruning.pruners import SparsityPattern, get_pruner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def import_reference(path: Path):
    """The reference ``SparseGPT`` class from a local checkout (``sparsegpt.py`` at ``path``)."""
    if not (path / "sparsegpt.py").is_file():
        raise SystemExit(f"--reference {path}: no sparsegpt.py there")
    sys.path.insert(0, str(path))  # its sparsegpt.py does `from quant import *`
    import sparsegpt as reference

    if not torch.cuda.is_available():
        # fasterprune ends with torch.cuda.synchronize(), which raises on a CPU-only torch
        # ("Torch not compiled with CUDA enabled"). On CPU there is nothing to wait for, so
        # the bench replaces it with a no-op; this changes nothing in the computation.
        torch.cuda.synchronize = lambda *args, **kwargs: None
    return reference.SparseGPT


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||W X - W_hat X||^2`` over the calibration rows, from ``H = X^T X``."""
    delta = (dense.double() - pruned.double()).to(xtx.device)  # (out, in)
    return float(((delta @ xtx.double()) * delta).sum())


def output_energy(dense: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||W X||^2``: the denominator of the relative error."""
    weight = dense.double().to(xtx.device)
    return float(((weight @ xtx.double()) * weight).sum())


class TimedPruner:
    """Wraps ``Pruner.prune`` to time each matrix; the engine calls it as usual."""

    def __init__(self, pruner, device: torch.device):
        self.inner, self.device = pruner, device
        self.seconds: dict[int, float] = {}  # id(stats) -> seconds
        self.pruner = dataclasses.replace(pruner, prune=self._prune)

    def _prune(self, weight, stats, pattern):
        _sync(self.device)
        start = time.perf_counter()
        result = self.inner.prune(weight, stats, pattern)
        _sync(self.device)
        self.seconds[id(stats)] = time.perf_counter() - start
        return result


def reference_pass(calibrator, index: int, reference_cls, device: torch.device):
    """Feed the reference SparseGPT the dense layer's Linear inputs, one segment at a time."""
    linears = prunable_weights(calibrator.model, index)
    objects = {name: reference_cls(copy.deepcopy(lin).to(device)) for name, lin in linears.items()}
    seconds = {name: 0.0 for name in linears}

    def hook(name):
        def add(_module, inputs, output):
            start = time.perf_counter()
            objects[name].add_batch(inputs[0].data, output.data)
            seconds[name] += time.perf_counter() - start

        return add

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    layer = calibrator.family.layers_of(calibrator.model)[index].to(device)
    try:
        with torch.no_grad():
            call = calibrator.layer_calls[index]  # this layer's own mask and rotary table
            for hidden in calibrator.hidden:
                layer(hidden[None], *call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
        layer.to("cpu")
    return objects, seconds


def reference_prune(obj, pattern: SparsityPattern, device: torch.device) -> tuple[float, dict]:
    """Run ``fasterprune`` (its prints captured); returns seconds and the pruned weight."""
    _sync(device)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        obj.fasterprune(pattern.sparsity, prunen=pattern.n, prunem=pattern.m, blocksize=128)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, {"weight": obj.layer.weight.data, "printed": printed.getvalue().split()}


def short(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``3.up_proj``."""
    parts = name.split(".")
    if len(parts) < 2:  # a random matrix of --shapes
        return name
    index = parts.index("layers") + 1 if "layers" in parts else 0
    return f"{parts[index]}.{parts[-2]}"


def warm_up(args, segments: torch.Tensor, reference_cls) -> None:
    """One untimed pass over layer 0 and small prunes: thread pools, allocator and lazy
    imports are not charged to whichever pruner happens to run first."""
    model, _ = load_model(args.model)
    device = torch.device(args.device)
    pattern = SparsityPattern.parse(args.pattern, args.sparsity)
    calibrator = LayerwiseCalibrator(model, segments[:1], device)
    linears = prunable_weights(model, 0)
    for name in args.pruners.split(","):
        pruner = get_pruner(name)
        stats = calibrator.statistics(0, pruner)
        first = next(iter(stats))
        pruner.prune(linears[first].weight.data.to(device), stats[first], pattern)
    if reference_cls is not None:
        objects, _ = reference_pass(calibrator, 0, reference_cls, device)
        reference_prune(next(iter(objects.values())), pattern, device)
    calibrator.advance(0)


def run_pruner(args, pruner_name: str, segments: torch.Tensor, reference_cls) -> dict:
    device = torch.device(args.device)
    model, _ = load_model(args.model)
    total_layers = num_layers(model)
    layers = min(args.layers or total_layers, total_layers)
    pattern = SparsityPattern.parse(args.pattern, args.sparsity)
    timed = TimedPruner(get_pruner(pruner_name), device)
    calibrator = LayerwiseCalibrator(model, segments, device)
    per_layer, matrices = [], []
    for index in range(layers):
        before = dataclasses.replace(calibrator.timings)
        stats = calibrator.statistics(index, timed.pruner)
        compare = reference_cls is not None and pruner_name == "sparsegpt"
        if compare:
            objects, ref_stats_seconds = reference_pass(calibrator, index, reference_cls, device)
        dense = {n: lin.weight.data.clone() for n, lin in prunable_weights(model, index).items()}
        calibrator.prune_layer(index, timed.pruner, pattern, stats=stats)
        pruned = {n: lin.weight.data for n, lin in prunable_weights(model, index).items()}
        for name in dense:
            row = {
                "matrix": name,
                "shape": list(dense[name].shape),
                "ours_s": timed.seconds[id(stats[name])],
                "ours_sparsity": float((pruned[name] == 0).float().mean()),
            }
            if compare:
                xtx = stats[name].xtx
                energy = output_energy(dense[name], xtx)
                obj = objects.pop(name)
                ref_hessian, ref_dense = obj.H.clone(), obj.layer.weight.data.clone()
                ref_s, ref = reference_prune(obj, pattern, device)
                ours_err = reconstruction_error(dense[name], pruned[name], xtx)
                ref_err = reconstruction_error(dense[name], ref["weight"], xtx)
                # The machine is shared and noisy: time both again, alternating; keep all.
                ours_times, ref_times = [row["ours_s"]], [ref_s]
                for _ in range(args.timing_repeats - 1):
                    _sync(device)
                    start = time.perf_counter()
                    timed.inner.prune(dense[name].to(device), stats[name], pattern)
                    _sync(device)
                    ours_times.append(time.perf_counter() - start)
                    obj.H, obj.layer.weight.data = ref_hessian.clone(), ref_dense.clone()
                    ref_times.append(reference_prune(obj, pattern, device)[0])
                del obj, ref_hessian, ref_dense
                row |= {
                    "ours_times_s": ours_times,
                    "ref_times_s": ref_times,
                    "ours_min_s": min(ours_times),
                    "ref_min_s": min(ref_times),
                    "ref_s": ref_s,
                    "ref_add_batch_s": ref_stats_seconds[name],
                    "ref_sparsity": float((ref["weight"] == 0).float().mean()),
                    "ours_err": ours_err,
                    "ref_err": ref_err,
                    "ours_rel_err": ours_err / energy,
                    "ref_rel_err": ref_err / energy,
                    "err_ratio": ours_err / ref_err if ref_err else float("nan"),
                }
                del ref
            matrices.append(row)
        calibrator.advance(index)
        after = calibrator.timings
        per_layer.append(
            {
                "layer": index,
                "statistics_s": after.statistics - before.statistics,
                "prune_s": after.prune - before.prune,
                "forward_s": after.forward - before.forward,
            }
        )
        print(
            f"  {pruner_name} layer {index}: "
            + " ".join(f"{k}={v:.2f}" for k, v in per_layer[-1].items() if k != "layer"),
            file=sys.stderr,
        )
    timings = dataclasses.asdict(calibrator.timings)
    return {
        "layers": layers,
        "total_layers": total_layers,
        "timings": timings,
        "total_s": sum(timings.values()),
        "per_layer": per_layer,
        "matrices": matrices,
    }


def synthetic_inputs(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Calibration rows like real activations: low rank plus noise, unequal column scales (a
    few large ones, as LLM activations have), so the Hessian is far from the identity."""
    latent = torch.randn(rows, 64, generator=generator) @ torch.randn(64, cols, generator=generator)
    noise = 0.1 * torch.randn(rows, cols, generator=generator)
    return (latent + noise) * torch.exp(torch.randn(cols, generator=generator))


def run_shapes(args, reference_cls) -> list[dict]:
    """Ours against ``fasterprune`` on random matrices of ``--shapes``, same weight and Hessian."""
    device = torch.device(args.device)
    pattern = SparsityPattern.parse(args.pattern, args.sparsity)
    pruner = get_pruner("sparsegpt")
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(x) for x in shape.lower().split("x"))
        weight = torch.randn(out_features, in_features, generator=generator).to(device)
        inputs = synthetic_inputs(args.segments * args.seqlen, in_features, generator).to(device)
        stats = pruner.make_stats(in_features, device)
        stats.add(inputs)
        linear = torch.nn.Linear(in_features, out_features, bias=False).to(device)
        ours_times, ref_times = [], []
        for _ in range(args.timing_repeats):  # alternating: load changes hit both alike
            _sync(device)
            start = time.perf_counter()
            ours, _ = pruner.prune(weight, stats, pattern)
            _sync(device)
            ours_times.append(time.perf_counter() - start)
            linear.weight.data = weight.clone()
            obj = reference_cls(linear)
            obj.H = stats.xtx.clone()  # fasterprune's own scaling does not matter: damp is relative
            seconds, ref = reference_prune(obj, pattern, device)
            ref_times.append(seconds)
        ours_err = reconstruction_error(weight, ours, stats.xtx)
        ref_err = reconstruction_error(weight, ref["weight"], stats.xtx)
        row = {
            "matrix": f"random {shape}",
            "shape": [out_features, in_features],
            "ours_s": ours_times[0],
            "ref_s": ref_times[0],
            "ours_times_s": ours_times,
            "ref_times_s": ref_times,
            "ours_min_s": min(ours_times),
            "ref_min_s": min(ref_times),
            "ref_add_batch_s": 0.0,
            "ours_sparsity": float((ours == 0).float().mean()),
            "ref_sparsity": float((ref["weight"] == 0).float().mean()),
            "ours_err": ours_err,
            "ref_err": ref_err,
            "ours_rel_err": ours_err / output_energy(weight, stats.xtx),
            "ref_rel_err": ref_err / output_energy(weight, stats.xtx),
            "err_ratio": ours_err / ref_err if ref_err else float("nan"),
        }
        print(
            f"  {shape}: ours {row['ours_min_s']:.3f} s, reference {row['ref_min_s']:.3f} s, "
            f"error ratio {row['err_ratio']:.4f}",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def engine_tables(results: dict) -> str:
    pruners = list(results)
    lines = [
        "Per layer, seconds (stats = statistics forward, fwd = forward to the next layer)",
        "",
        "| layer | " + " | ".join(f"{p} stats | {p} prune | {p} fwd" for p in pruners) + " |",
        "|---|" + "---|---|---|" * len(pruners),
    ]
    for index in range(len(results[pruners[0]]["per_layer"])):
        cells = []
        for p in pruners:
            row = results[p]["per_layer"][index]
            cells += [f"{row[key]:.2f}" for key in ("statistics_s", "prune_s", "forward_s")]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Whole run (the layers above), seconds",
        "",
        "| pruner | layers | capture | statistics | prune | forward | total "
        "| calibration forwards share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pruners:
        t, total = results[p]["timings"], results[p]["total_s"]
        forwards = t["capture"] + t["statistics"] + t["forward"]
        lines.append(
            f"| {p} | {results[p]['layers']}/{results[p]['total_layers']} | {t['capture']:.2f} "
            f"| {t['statistics']:.2f} | {t['prune']:.2f} | {t['forward']:.2f} | {total:.2f} "
            f"| {forwards / total:.0%} |"
        )
    return "\n".join(lines)


def reference_tables(rows: list[dict]) -> str:
    lines = [
        "SparseGPT pruning step per matrix: ours vs IST-DASLab/sparsegpt fasterprune, same inputs",
        "(times: min over repeats, alternating; err = ||WX - W^X||^2 on the calibration "
        "inputs; rel = err / ||WX||^2)",
        "",
        "| matrix | shape | ours s | ref s | ref/ours time | ours rel err | ref rel err "
        "| ours/ref err | ours sparsity | ref sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {short(r['matrix'])} | {r['shape'][0]}x{r['shape'][1]} | {r['ours_min_s']:.3f} "
            f"| {r['ref_min_s']:.3f} | {r['ref_min_s'] / r['ours_min_s']:.2f}x "
            f"| {r['ours_rel_err']:.5f} "
            f"| {r['ref_rel_err']:.5f} | {r['err_ratio']:.4f} | {r['ours_sparsity']:.5f} "
            f"| {r['ref_sparsity']:.5f} |"
        )
    ours_s, ref_s = sum(r["ours_min_s"] for r in rows), sum(r["ref_min_s"] for r in rows)
    ours_1st, ref_1st = sum(r["ours_s"] for r in rows), sum(r["ref_s"] for r in rows)
    repeats = len(rows[0]["ours_times_s"])
    ratios = [r["err_ratio"] for r in rows]
    ours_err, ref_err = sum(r["ours_err"] for r in rows), sum(r["ref_err"] for r in rows)
    lines += [
        "",
        "| summary | value |",
        "|---|---|",
        f"| matrices | {len(rows)} |",
        f"| pruning time, ours (sum of per-matrix min of {repeats}) | {ours_s:.2f} s |",
        f"| pruning time, reference (sum of per-matrix min of {repeats}) | {ref_s:.2f} s |",
        f"| reference / ours time (min of {repeats}) | {ref_s / ours_s:.2f}x |",
        f"| reference / ours time (first run only) | {ref_1st / ours_1st:.2f}x |",
        f"| reference add_batch time (sum, not in ours) | "
        f"{sum(r['ref_add_batch_s'] for r in rows):.2f} s |",
        f"| summed error, ours / reference | {ours_err / ref_err:.4f} |",
        f"| per-matrix error ratio: min / median / max | {min(ratios):.4f} / "
        f"{sorted(ratios)[len(ratios) // 2]:.4f} / {max(ratios):.4f} |",
        f"| matrices with ours error > 1.01 x reference | {sum(x > 1.01 for x in ratios)} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=0, help="first N layers (0: all)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-data", default="python-docs")
    parser.add_argument("--pruners", default="sparsegpt,wanda", help='"": none (with --shapes)')
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timing-repeats",
        type=int,
        default=3,
        help="prune each matrix this often with ours and the reference, alternating (min kept)",
    )
    parser.add_argument(
        "--reference", type=Path, help="local checkout of IST-DASLab/sparsegpt (optional)"
    )
    parser.add_argument(
        "--shapes",
        default="",
        help="also prune random OUTxIN matrices (e.g. 576x576,2048x2048) with ours and the "
        "reference on one Hessian of --segments x --seqlen rows; needs --reference",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_speed.json")
    args = parser.parse_args()
    if args.shapes and not args.reference:
        parser.error("--shapes compares against the reference: give --reference PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference_cls = import_reference(args.reference.resolve()) if args.reference else None

    info = machine()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
        f"torch {info['torch']} with {info['torch_threads']} threads, "
        f"load average {info['loadavg_at_start']}, device {args.device}"
    )
    wall = time.perf_counter()
    _, tokenizer = load_model(args.model)
    segments = calibration_segments(
        args.calib_data, tokenizer, seqlen=args.seqlen, num_segments=args.segments, seed=args.seed
    )
    pruners = [name for name in args.pruners.split(",") if name]
    if pruners:
        warm_up(args, segments, reference_cls)
    results = {name: run_pruner(args, name, segments, reference_cls) for name in pruners}
    print(
        f"\n{args.model}, {args.segments} x {args.seqlen} {args.calib_data} segments, "
        f"{SparsityPattern.parse(args.pattern, args.sparsity)}\n"
    )
    if results:
        print(engine_tables(results))
    compared = [r for r in results.get("sparsegpt", {}).get("matrices", []) if "ref_s" in r]
    if compared:
        print()
        print(reference_tables(compared))
    shapes = run_shapes(args, reference_cls) if args.shapes else []
    if shapes:
        print()
        print(reference_tables(shapes).replace("same inputs", "random matrices, one Hessian"))
    wall = time.perf_counter() - wall
    print(f"\nbench wall time {wall:.1f} s")
    write_results(args.out, info=info, args=args, results=results, shapes=shapes, wall_s=wall)


if __name__ == "__main__":
    main()
