"""Speed and accuracy of the exact masked least squares (``reconstruction="lsq"``), on the CPU
or a GPU (``--device cuda``).

For each ``--shapes`` matrix (random weight; Hessian of ``--segments x --seqlen`` synthetic
activation rows, see :func:`activations`) and each ``--patterns`` entry, the bench times:

* ``sgpt``: SparseGPT choosing the mask and sweeping (``sparsegpt_prune``);
* ``lsq``: :func:`llm_pruning.pruners.lsq.masked_least_squares` under that mask, started from
  SparseGPT's values (what ``reconstruction="lsq"`` adds to ``sgpt``), with the number of
  matrix products (CG iterations, summed over row batches) it took;
* ``lsq@k``: the same capped at ``--budget-iterations`` products (the time/accuracy trade);
* ``direct``: the batched direct solve (rows grouped by kept count, Cholesky of the gathered
  ``H_SS`` blocks) in float32, timed on ``--sample-rows`` rows and scaled to all rows (its
  time is linear in the rows; running it on all rows would take minutes per matrix).

Errors are ``‖(W − W₀) X‖²`` on the calibration rows (from ``H``), over the sampled rows,
relative to a float64 direct solve of the same rows (the optimum of the dampened problem that
every method here minimises: ``obj`` is that dampened error, for which 1.0 is a lower bound).

With ``--model`` the matrices are instead every prunable Linear of ``--layers`` of a real
model, each with its own Hessian from the dense model's calibration forwards (``python-docs``).

    python bench/lsq_speed.py                        # all shapes, 50 %, 70 %, 2:4
    python bench/lsq_speed.py --shapes 576x576 --patterns 0.5 --threads 1
    python bench/lsq_speed.py --model smollm2-135m --layers 0,3 \\
        --out bench/results/lsq_speed_smollm2.json   # SmolLM2's own Hessians

    python bench/lsq_speed.py --device cuda --shapes 4096x4096,11008x4096,4096x11008 \\
        --out bench/results/lsq_speed_cuda.json     # LLaMA-7B's shapes on a GPU

Times are minima over ``--repeats`` runs, SparseGPT and lsq alternating (the machine may be
shared); on a GPU each is timed to the device's synchronisation. The synthetic matrices and
activations are drawn on the CPU (the same numbers on every device), then moved. Writes
bench/results/lsq_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from _common import machine, write_results  # noqa: E402
from engine_speed import reconstruction_error  # noqa: E402

from llm_pruning.data import calibration_segments  # noqa: E402
from llm_pruning.engine import LayerwiseCalibrator  # noqa: E402
from llm_pruning.families import prunable_weights  # noqa: E402
from llm_pruning.models import load_model  # noqa: E402
from llm_pruning.pruners import (  # noqa: E402
    HessianStats,
    SparsityPattern,
    get_pruner,
    lsq,
    sparsegpt_prune,
)
from llm_pruning.pruners.hessian import prepared_hessian  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPES = "576x576,1536x576,576x1536,2048x2048,8192x2048"
PATTERNS = "0.5,0.7,2:4"
_DIRECT_CHUNK = 1 << 24  # elements of gathered H_SS blocks per batched Cholesky


def activations(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Calibration rows whose Hessian looks like a real LLM's to the solvers.

    Covariance eigenvalues fall off as a power law (``i^-1.4``) in a random basis, columns get
    log-normal scales, and 1 % of them are 10x outliers. At 576 inputs the dampened Hessian
    scaled to a unit diagonal then has a condition of 1e4, top eigenvalue ~140 and median
    ~0.15 (SmolLM2-135M's layers 0 and 3: 2e3-2e6, 25-200, 0.1-0.5), and SparseGPT lands
    1.8-2.3x above the optimum (SmolLM2: 1.3-4.4x). ``bench/engine_speed.py``'s
    low-rank-plus-noise rows put SparseGPT 100x above it: their optimum is far easier.
    """
    spectrum = (1.0 + torch.arange(cols, dtype=torch.float32)) ** -0.7
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    samples = (torch.randn(rows, cols, generator=generator) * spectrum) @ basis.T
    scale = torch.exp(0.5 * torch.randn(cols, generator=generator))
    scale[torch.randperm(cols, generator=generator)[: cols // 100]] *= 10.0
    return samples * scale


def parse_pattern(text: str) -> SparsityPattern:
    """``0.5`` (unstructured) or ``2:4``."""
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return SparsityPattern(1 - n / m, n, m)
    return SparsityPattern(float(text))


def damped_hessian(xtx: torch.Tensor, dtype: torch.dtype, damp_fraction: float = 0.01):
    """``H + λI`` as lsq and SparseGPT build it (the synthetic ``H`` needs no retries)."""
    hessian, dead = prepared_hessian(xtx, xtx.device, dtype)
    hessian.diagonal().add_(damp_fraction * hessian.diagonal().mean())
    return hessian, dead


def direct_solve(dense: torch.Tensor, keep: torch.Tensor, damped: torch.Tensor) -> torch.Tensor:
    """``w_S = w₀_S + H_SS⁻¹ H_SP w₀_P`` for every row, by batched Cholesky.

    Rows sorted by kept count go in chunks; each chunk's blocks are gathered at the chunk's
    largest count, the padding given a unit diagonal and a zero right-hand side.
    """
    dense = dense.to(damped.dtype)
    rhs = (dense * ~keep) @ damped  # (rows, in): H_jP w₀_P for every j
    counts = keep.sum(dim=1)
    order = torch.argsort(counts, descending=True, stable=True)
    out = dense * keep
    first = 0
    while first < order.numel():
        width = int(counts[order[first]])
        chunk = order[first : first + max(1, _DIRECT_CHUNK // max(1, width * width))]
        first += chunk.numel()
        if width == 0:
            continue
        # Kept columns first (a stable sort of "pruned"), cut at the chunk's widest row.
        index = torch.argsort((~keep[chunk]).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.gather(keep[chunk], 1, index)  # (c, width)
        blocks = damped[index.unsqueeze(2), index.unsqueeze(1)]  # (c, width, width)
        blocks *= valid.unsqueeze(2) & valid.unsqueeze(1)
        blocks.diagonal(dim1=1, dim2=2).add_((~valid).to(blocks.dtype))
        factor = torch.linalg.cholesky(blocks)
        step = torch.cholesky_solve(
            (torch.gather(rhs[chunk], 1, index) * valid).unsqueeze(2), factor
        )
        values = torch.gather(dense[chunk], 1, index) + step.squeeze(2)
        rows = out[chunk]
        rows.scatter_(1, index, values * valid)
        out[chunk] = rows
    return out


@contextlib.contextmanager
def counted_products():
    """Count the CG iterations (one matrix product each) of lsq calls inside the block."""
    count = [0]
    original = lsq._BatchedPCG._step

    def step(self) -> None:
        count[0] += 1
        original(self)

    lsq._BatchedPCG._step = step
    try:
        yield count
    finally:
        lsq._BatchedPCG._step = original


def timed(function, *args, **kwargs):
    """Seconds of ``function(*args, **kwargs)`` and its result; CUDA work finished in both."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    synchronize()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize()
    return time.perf_counter() - start, result


def synthetic_case(shape: str, args, generator: torch.Generator) -> tuple[str, Tensor, Tensor]:
    """``(label, weight, Σ xᵀx)`` of a random ``OUTxIN`` matrix on :func:`activations`."""
    out_features, in_features = (int(x) for x in shape.lower().split("x"))
    weight = torch.randn(out_features, in_features, generator=generator)
    stats = HessianStats(in_features)
    stats.add(activations(args.segments * args.seqlen, in_features, generator))
    return shape, weight.to(args.device), stats.xtx.to(args.device)


def model_cases(args) -> list[tuple[str, Tensor, Tensor]]:
    """``(label, weight, Σ xᵀx)`` of every prunable matrix of ``--layers`` of ``--model``, on
    its calibration data through the dense model (as the engine's first pass sees it)."""
    model, tokenizer = load_model(args.model)
    segments = calibration_segments(
        "python-docs", tokenizer, seqlen=args.seqlen, num_segments=args.segments, seed=args.seed
    )
    layers = sorted(int(x) for x in args.layers.split(","))
    calibrator = LayerwiseCalibrator(model, segments)
    cases = []
    for index in range(layers[-1] + 1):
        if index in layers:
            stats = calibrator.statistics(index, get_pruner("sparsegpt"))
            for name, linear in prunable_weights(model, index).items():
                label = f"{index}.{name.split('.')[-2]}"
                weight, xtx = linear.weight.data, stats[name].xtx
                cases.append(
                    (label, weight.to(args.device, copy=True), xtx.to(args.device, copy=True))
                )
        calibrator.advance(index)
    return cases


def run_case(label: str, weight: Tensor, xtx: Tensor, pattern_text: str, args) -> dict:
    """Time SparseGPT, lsq, capped lsq and the direct solve on one matrix; score them."""
    pattern = parse_pattern(pattern_text)
    stats = HessianStats(weight.shape[1])
    stats.xtx = xtx
    options = {"tolerance": args.tolerance, "max_iterations": args.max_iterations}
    sgpt_times, lsq_times = [], []
    for _ in range(args.repeats):  # alternating: load changes hit both alike
        seconds, (swept, keep) = timed(sparsegpt_prune, weight, stats, pattern)
        sgpt_times.append(seconds)
        with counted_products() as products:
            seconds, exact = timed(
                lsq.masked_least_squares, weight, keep, xtx, initial=swept, **options
            )
        lsq_times.append(seconds)
    budget_s, budget = timed(
        lsq.masked_least_squares,
        weight,
        keep,
        xtx,
        initial=swept,
        max_iterations=args.budget_iterations,
    )
    scores, direct_s = score(
        weight, keep, xtx, {"sgpt": swept, "lsq": exact, "budget": budget}, args
    )
    sgpt_s, lsq_s = min(sgpt_times), min(lsq_times)
    row = {
        "matrix": label,
        "shape": list(weight.shape),
        "pattern": str(pattern),
        "sgpt_s": sgpt_s,
        "lsq_s": lsq_s,
        "sgpt_times_s": sgpt_times,
        "lsq_times_s": lsq_times,
        "lsq_products": products[0],
        "lsq_total_over_sgpt": (sgpt_s + lsq_s) / sgpt_s,
        "budget_iterations": args.budget_iterations,
        "budget_s": budget_s,
        "direct_s_extrapolated": direct_s,
        **scores,
    }
    print(
        f"  {label} {pattern}: sgpt {sgpt_s:.3f} s (err {row['sgpt_err_ratio']:.3f}), "
        f"lsq +{lsq_s:.3f} s in {products[0]} products (err {row['lsq_err_ratio']:.4f}), "
        f"direct ~{direct_s:.1f} s",
        file=sys.stderr,
    )
    return row


def score(weight: Tensor, keep: Tensor, xtx: Tensor, candidates: dict, args) -> tuple[dict, float]:
    """Each candidate's error and dampened error over sampled rows, relative to the float64
    direct solve's; and the float32 direct solve's time, scaled to all rows."""
    rows = torch.linspace(0, weight.shape[0] - 1, min(args.sample_rows, weight.shape[0])).long()
    damped32, dead = damped_hessian(xtx, torch.float32)
    dense = weight.clone()
    dense[:, dead] = 0.0
    direct_s, _ = timed(direct_solve, dense[rows], keep[rows], damped32)
    damped64, _ = damped_hessian(xtx, torch.float64)
    optimum = direct_solve(dense[rows].double(), keep[rows], damped64)
    best = {
        "err": reconstruction_error(weight[rows], optimum, xtx),
        "obj": reconstruction_error(weight[rows], optimum, damped64),
    }
    scores = {"sampled_rows": rows.numel()}
    for name, candidate in candidates.items():
        scores[f"{name}_err_ratio"] = (
            reconstruction_error(weight[rows], candidate[rows], xtx) / best["err"]
        )
        scores[f"{name}_obj_ratio"] = (
            reconstruction_error(weight[rows], candidate[rows], damped64) / best["obj"]
        )
    return scores, direct_s * weight.shape[0] / rows.numel()


def table(rows: list[dict], budget: int) -> str:
    lines = [
        "Times in seconds (min over repeats); lsq is added to SparseGPT's sweep; direct is "
        "extrapolated from sampled rows.",
        "err: ||(W - W0) X||^2 over sampled rows / float64 direct solve's; obj: the same for "
        "the dampened error that all minimise (>= 1).",
        "",
        f"| matrix | shape | pattern | sgpt s | lsq s | CG its | (sgpt+lsq)/sgpt | lsq@{budget} s "
        f"| direct s | sgpt err | lsq err | lsq obj | lsq@{budget} err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} "
            f"| {r['sgpt_s']:.3f} "
            f"| {r['lsq_s']:.3f} | {r['lsq_products']} | {r['lsq_total_over_sgpt']:.1f}x "
            f"| {r['budget_s']:.3f} | {r['direct_s_extrapolated']:.1f} "
            f"| {r['sgpt_err_ratio']:.3f} | {r['lsq_err_ratio']:.4f} | {r['lsq_obj_ratio']:.4f} "
            f"| {r['budget_err_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=SHAPES, help="OUTxIN, comma-separated")
    parser.add_argument(
        "--model", default="", help="real Hessians instead: this model's --layers (dense)"
    )
    parser.add_argument("--layers", default="0,3", help="with --model: decoder layer ids")
    parser.add_argument("--patterns", default=PATTERNS, help="sparsities and N:M, e.g. 0.5,2:4")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (min kept)")
    parser.add_argument("--tolerance", type=float, default=lsq.TOLERANCE)
    parser.add_argument("--max-iterations", type=int, default=lsq.MAX_ITERATIONS)
    parser.add_argument("--budget-iterations", type=int, default=4)
    parser.add_argument("--sample-rows", type=int, default=32, help="rows for the references")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the solvers run: cpu, cuda")
    parser.add_argument("--out", type=Path, default=RESULTS / "lsq_speed.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(
        f"machine: {info['cpu_count']} CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads, load average {info['loadavg_at_start']}",
        file=sys.stderr,
    )
    # Untimed: thread pools, the allocator and numba's compiled sweep are ready for case one.
    warm = torch.Generator().manual_seed(args.seed)
    run_case(*synthetic_case("64x64", args, warm), "0.5", args)
    wall = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    if args.model:
        cases = model_cases(args)
    else:
        cases = [synthetic_case(shape, args, generator) for shape in args.shapes.split(",")]
    rows = [
        run_case(label, weight, xtx, pattern, args)
        for label, weight, xtx in cases
        for pattern in args.patterns.split(",")
    ]
    print(table(rows, args.budget_iterations))
    elapsed = time.perf_counter() - wall
    write_results(
        args.out,
        info=info,
        args=args,
        skip=("out",),
        measured=time.strftime("%Y-%m-%d"),  # the date docs/results.md's header wants
        results=rows,
        wall_s=elapsed,
    )


if __name__ == "__main__":
    main()
