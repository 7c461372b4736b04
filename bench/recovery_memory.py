"""A recovery client's GPU memory at LLaMA-7B shape: does ``lora`` fit a 24 GB card, and
what does ``masked`` need?

The model has ``synthetic-7b``'s shape (LLaMA-2-7B: 32 layers, hidden 4096, MLP 11008,
6.74e9 parameters) with random weights drawn on the GPU, every prunable matrix pruned to 50 %
(the smallest half of each row), and is handed to the code on the CPU, as a client loads it.
Each case runs ``llm_pruning.recovery.recover`` (a client's whole part of a recovery round but
the wire) for ``--steps`` steps of ``--batch`` random windows of T tokens, then checks that the
zero set did not move. Reported: the GPU's peak allocated and reserved bytes, the process's
peak RSS, seconds, and whether it ran out of memory.

Cases (``--cases``, in order; one that runs out of memory does not stop the others):

- ``lora-512``, ``lora-2048``: lora on the bf16 base at T = 512 (the run config's ``seqlen``)
  and 2048, with the allocator capped at ``--card-gib`` (a 24 GB card's 24 GiB less ~1 GiB of
  CUDA context): running out of memory there means it would not fit such a card.
- ``lora-2048-kept``: the same with every activation kept (no checkpointing), uncapped: what
  the recomputation saves.
- ``masked-512``: masked on the float32 model (it refuses half precision), uncapped.

Random weights and windows: memory and time depend on shapes, not on values (the losses are
meaningless). Writes bench/results/recovery_memory.json (``--out``).

    python bench/recovery_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from _common import machine, proc_status_bytes, write_results  # noqa: E402

from llm_pruning import recovery  # noqa: E402
from llm_pruning.families import num_layers, prunable_weights  # noqa: E402
from llm_pruning.recovery import RecoverySettings, recover  # noqa: E402
from llm_pruning.synthetic import synthetic_config  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
GIB = 2**30
# name: (method, dtype, T, cap the allocator at a 24 GB card, recompute activations)
CASES = {
    "lora-512": ("lora", torch.bfloat16, 512, True, True),
    "lora-2048": ("lora", torch.bfloat16, 2048, True, True),
    "lora-2048-kept": ("lora", torch.bfloat16, 2048, False, False),
    "masked-512": ("masked", torch.float32, 512, False, False),
}


def pruned_model(name: str, dtype: torch.dtype, device: str, layers: int) -> LlamaForCausalLM:
    """``name``'s shape (``layers`` decoder layers if not 0), random weights drawn on
    ``device``, prunable matrices at 50 % (the smallest half of each row), in ``dtype`` on the
    CPU."""
    config = synthetic_config(name)
    if layers:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are computed, not drawn
    prunable = {
        name for index in range(num_layers(model)) for name in prunable_weights(model, index)
    }
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            drawn = torch.randn(param.shape, generator=generator, device=device).mul_(0.02)
            if name in prunable:
                cut = drawn.abs().kthvalue(drawn.shape[1] // 2, dim=1, keepdim=True).values
                drawn.mul_(drawn.abs() > cut)
            param.copy_(drawn)
            del drawn
    return model


def run_case(model, name: str, args) -> dict:
    method, _, seqlen, capped, recompute = CASES[name]
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and device.index is None:  # the allocator's settings want an index
        device = torch.device("cuda", torch.cuda.current_device())
    cap = args.card_gib * GIB if capped else None
    if gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap or total) / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    windows = torch.randint(0, model.config.vocab_size, (2 * args.batch, seqlen))
    settings = RecoverySettings(method, steps=args.steps, lr=1e-4, batch_size=args.batch)
    masks = recovery.sparsity_masks(model)
    row = {
        "case": name,
        "method": method,
        "dtype": str(model.dtype).removeprefix("torch."),
        "seqlen": seqlen,
        "batch": args.batch,
        "steps": args.steps,
        "activations": "recomputed" if recompute and method == "lora" else "kept",
        "allocator_cap_bytes": cap,
    }
    start = time.perf_counter()
    try:
        with contextlib.nullcontext() if recompute else _activations_kept():
            result = recover(model, windows, settings, device=device)
        row |= {"fits": True, "seconds": round(result.seconds, 1), "losses": result.losses}
    except torch.OutOfMemoryError as error:
        row |= {"fits": False, "error": str(error).splitlines()[0][:300]}
        row["seconds"] = round(time.perf_counter() - start, 1)
    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if gpu else None
    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) if gpu else None
    row["peak_rss_bytes"] = proc_status_bytes("VmHWM")
    after = recovery.sparsity_masks(model)
    row["zero_set_unchanged"] = all(torch.equal(after[n], mask) for n, mask in masks.items())
    del after, masks
    peak = (row["peak_allocated_bytes"] or 0) / GIB
    print(
        f"{name}: fits {row['fits']}, GPU peak {peak:.2f} GiB allocated, {row['seconds']} s, "
        f"zeros kept {row['zero_set_unchanged']}",
        flush=True,
    )
    return row


@contextlib.contextmanager
def _activations_kept():
    original = recovery.recomputed_activations
    recovery.recomputed_activations = lambda _model: contextlib.nullcontext()
    try:
        yield
    finally:
        recovery.recomputed_activations = original


def table(rows: list[dict]) -> str:
    lines = [
        "| case | method | dtype | T x batch | activations | allocator cap GiB | fits "
        "| GPU peak allocated GiB | GPU peak reserved GiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = f"{r['allocator_cap_bytes'] / GIB:g}" if r["allocator_cap_bytes"] else "card"
        allocated, reserved = (
            f"{r[key] / GIB:.2f}" if r[key] is not None else "-"
            for key in ("peak_allocated_bytes", "peak_reserved_bytes")
        )
        lines.append(
            f"| {r['case']} | {r['method']} | {r['dtype']} | {r['seqlen']} x {r['batch']} "
            f"| {r['activations']} | {cap} | {'yes' if r['fits'] else 'NO (out of memory)'} "
            f"| {allocated} | {reserved} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="synthetic-7b", help="a synthetic model's shape")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="windows per step (the run's)")
    parser.add_argument("--card-gib", type=float, default=23.0)
    parser.add_argument("--layers", type=int, default=0, help="fewer decoder layers (a dry run)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run")
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery_memory.json")
    args = parser.parse_args()
    names = [name for name in args.cases.split(",") if name]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("this bench measures GPU memory: no CUDA device here")
    info = machine()
    wall = time.perf_counter()
    rows, model = [], None
    for name in names:
        dtype = CASES[name][1]
        if model is None or model.dtype != dtype:
            model = None  # free the other dtype's copy first
            model = pruned_model(args.model, dtype, args.device, args.layers)
        rows.append(run_case(model, name, args))
        write_results(  # after every case: a run stopped midway keeps what it measured
            args.out,
            info=info,
            args=args,
            skip=("out",),
            measured=time.strftime("%Y-%m-%d"),
            table=table(rows),
            rows=rows,
            wall_s=round(time.perf_counter() - wall, 1),
        )
    print(table(rows))


if __name__ == "__main__":
    main()
