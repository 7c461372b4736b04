"""What hostile members can do to the merged model, under each aggregation rule.

One poisoner among 3 clients, and two among 7, on SmolLM2-135M with Austen's novels. The
honest clients prune for real (the ClientApp's task); the poisoners send the attacks of
issue 15 built from their own honest payloads (``attacks.py``), and three adaptive ones that
stay just inside the value bound (0.95 of ``max-relative-change x sqrt(s/(1-s))`` on every
matrix):

- ``amplify``: their own SparseGPT compensation, stretched to the bound;
- ``noise``: a random direction of that size;
- ``shrink``: every kept value pulled towards 0 by that much (the model loses its weights).

Every reply goes through the strategy's real ``aggregate_train``. Figures, per rule
(``mean`` is the paper's, ``trimmed-mean`` and ``median`` are robust): whether the server
rejected the poisoners, the relative Frobenius change of the merged matrices against the
honest-only model (the poisoners left out), and the perplexity on *Persuasion* (held out).
For scale, ``drop one honest`` is the change that leaving out one more honest member makes.

    python bench/poisoning.py                       # SmolLM2-135M: about 20 min on 2 cores
    python bench/poisoning.py --model tiny-llama --seqlen 64 --segments 2 --eval-windows 2

Writes bench/results/poisoning.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import add_quality_arguments, machine, write_results
from attacks import forge, lying_records, payload_content, reply, semantic_attacks, split

from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.merge.plausibility import change_bound
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from server_app.inprocess import _set_task_identity
from server_app.report import Evaluator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RULES = ("mean", "trimmed-mean", "median")
ATTACKS = (
    "lying-array",
    "x1000",
    "1e30",
    "exponent-bit",
    "random",
    "sign-flip-largest",
    "keep-all",
    "amplify",
    "noise",
    "shrink",
)


def adaptive(data: bytes, dense: dict, bound: float, how: str, seed: int) -> bytes:
    """A payload whose every matrix moves 0.95 * ``bound`` (relative) from the dense weights."""
    _, values, masks = split(data)
    generator = torch.Generator().manual_seed(seed)
    poisoned = {}
    for name, kept in values.items():
        base = dense[name][masks[name]]
        if how == "amplify":
            direction = kept - base
        elif how == "noise":
            direction = torch.randn(base.shape, generator=generator)
        else:  # shrink
            direction = -base
        poisoned[name] = base + direction * (0.95 * bound * base.norm() / direction.norm())
    return forge(poisoned, masks)


def attack_contents(data: bytes, model, dense: dict, bound: float, seed: int) -> dict:
    """Every attack of ``ATTACKS``, built once from one poisoner's honest payload."""
    forged = semantic_attacks(data, model, nm=False)
    contents = {name: payload_content(forged[name]) for name in ATTACKS if name in forged}
    contents["lying-array"] = lying_records(data)["pickled-object"]
    for how in ("amplify", "noise", "shrink"):
        contents[how] = payload_content(adaptive(data, dense, bound, how, seed))
    return contents


class Federation:
    """K clients' honest payloads, merged under any rule with any replies swapped in."""

    def __init__(self, args, clients: int, partition: str):
        self.config = RunConfig.from_mapping(
            {
                "model": args.model,
                "calib-data": str(args.data / "novels"),
                "partition": partition,
                "calib-samples": args.segments,
                "seqlen": args.seqlen,
                "eval-data": str(args.data / "persuasion.txt"),
                "eval-windows": args.eval_windows,
                "seed": args.seed,
                "resolve": False,
            }
        )
        self.model, tokenizer = load_model(args.model)
        self.dense = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.layers = list(range(num_layers(self.model)))
        start = time.perf_counter()
        self.honest = {node: self._honest(args, node, clients) for node in range(1, clients + 1)}
        self.prune_seconds = round(time.perf_counter() - start, 1)
        self.evaluator = Evaluator(self.config, tokenizer)
        self.scores: dict[str, float] = {}
        self.names = [n for layer in self.layers for n in prunable_weights(self.model, layer)]

    def _honest(self, args, node: int, clients: int) -> bytes:
        """Node ``node``'s real pruned payload, kept in ``--cache`` for a rerun."""
        config = self.config  # (its calib-data is a scratch copy: not part of the key)
        settings = (config.model, config.partition, config.calib_samples, config.seqlen)
        settings += (config.seed, config.pruner, config.pattern, config.sparsity, node, clients)
        key = hashlib.sha1(repr(settings).encode()).hexdigest()[:16]
        path = args.cache / f"{key}.safetensors"
        if not path.exists():
            shard = NodeConfig(partition_id=node - 1, num_partitions=clients)
            args.cache.mkdir(parents=True, exist_ok=True)
            path.write_bytes(prune_layers(self.config, shard, self.layers).payload)
        return path.read_bytes()

    def merge(self, contents: dict, aggregation: str) -> tuple[list[int], dict]:
        """(rejected nodes, merged prunable matrices) of one round over ``contents``."""
        for name, parameter in self.model.named_parameters():
            parameter.data.copy_(self.dense[name])
        config = replace(self.config, aggregation=aggregation)
        strategy = MergeStrategy(self.model, config)
        strategy.assignments = {node: self.layers for node in contents}
        strategy.aggregate_train(1, [reply(node, c) for node, c in contents.items()])
        params = dict(self.model.named_parameters())
        rejected = sorted({r["node"] for r in strategy.accounting.rejected})
        return rejected, {n: params[n].detach().clone() for n in self.names}

    def perplexity(self, merged: dict) -> float:
        digest = hashlib.sha1()
        for name in self.names:
            digest.update(merged[name].contiguous().view(torch.uint8).numpy().tobytes())
        key = digest.hexdigest()
        if key not in self.scores:
            params = dict(self.model.named_parameters())
            for name in self.names:
                params[name].data.copy_(merged[name])
            self.scores[key] = next(iter(self.evaluator(self.model, "merged").values()))
        return self.scores[key]

    def change(self, merged: dict, reference: dict) -> float:
        num = sum(
            float((merged[n].double() - reference[n].double()).norm() ** 2) for n in self.names
        )
        den = sum(float(reference[n].double().norm() ** 2) for n in self.names)
        return round((num / den) ** 0.5, 4)


def measure(args, clients: int, poisoners: int, partition: str) -> dict:
    fed = Federation(args, clients, partition)
    bound = change_bound(fed.config.sparsity_pattern, fed.config.max_relative_change)
    hostile = list(range(clients - poisoners + 1, clients + 1))
    honest = {n: payload_content(d) for n, d in fed.honest.items() if n not in hostile}
    every_honest = {n: payload_content(d) for n, d in fed.honest.items()}
    forged = {
        node: attack_contents(fed.honest[node], fed.model, fed.dense, bound, seed=node)
        for node in hostile
    }
    rows: dict[str, dict] = {}
    honest_only = {}
    for rule in RULES:
        _, honest_only[rule] = fed.merge(honest, rule)
        _, dropped = fed.merge(dict(list(honest.items())[1:]), rule)
        _, all_honest = fed.merge(every_honest, rule)
        rows.setdefault("honest only", {})[rule] = {"perplexity": fed.perplexity(honest_only[rule])}
        rows.setdefault("all honest", {})[rule] = {
            "perplexity": fed.perplexity(all_honest),
            "change": fed.change(all_honest, honest_only[rule]),
        }
        rows.setdefault("drop one honest", {})[rule] = {
            "perplexity": fed.perplexity(dropped),
            "change": fed.change(dropped, honest_only[rule]),
        }
    for attack in ATTACKS:
        contents = {**honest, **{node: forged[node][attack] for node in hostile}}
        for rule in RULES:
            if rows.get(attack, {}).get("mean", {}).get("rejected"):
                # Rejection comes before aggregation: the model is the honest-only one exactly
                # (tests/test_hostile.py), whatever the rule.
                merged, rejected = honest_only[rule], hostile
            else:
                rejected, merged = fed.merge(contents, rule)
            rows.setdefault(attack, {})[rule] = {
                "rejected": rejected == hostile,
                "perplexity": fed.perplexity(merged),
                "change": fed.change(merged, honest_only[rule]),
            }
            logging.info("%d clients, %s, %s: %s", clients, rule, attack, rows[attack][rule])
    return {
        "clients": clients,
        "poisoners": poisoners,
        "partition": partition,
        "bound": round(bound, 4),
        "prune_seconds": fed.prune_seconds,
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [
            f"**{result['poisoners']} poisoner(s) among {result['clients']} clients** "
            f"(partition {result['partition']}; value bound {result['bound']:g}): relative "
            "change of the merged matrices against the honest-only model / perplexity on "
            "Persuasion; R = the server rejected the poisoners",
            "",
            "| replies | " + " | ".join(RULES) + " |",
            "|---|" + "---|" * len(RULES),
        ]
        for row, cells in result["rows"].items():
            shown = []
            for rule in RULES:
                cell = cells[rule]
                mark = "R " if cell.get("rejected") else ""
                change = f"{cell['change']:.3f} / " if "change" in cell else ""
                shown.append(f"{mark}{change}{cell['perplexity']:.2f}")
            lines.append(f"| {row} | " + " | ".join(shown) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data", type=Path, default=None, help="novels/ and persuasion.txt (default: Austen)"
    )
    add_quality_arguments(parser, RESULTS)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "fedspallm" / "poisoning",
        help="honest payloads, reused by a rerun with the same settings",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fedspallm_strategy").setLevel(logging.ERROR)
    _set_task_identity(1)
    info = machine()
    with tempfile.TemporaryDirectory() as scratch:
        args.data = args.data or _austen_split(Path(scratch))
        results = [measure(args, 3, 1, "by-document"), measure(args, 7, 2, "iid")]
    table = markdown(results)
    write_results(args.out / "poisoning.json", info=info, args=args, results=results)
    (args.out / "poisoning.md").write_text(table)
    print(table)


def _austen_split(folder: Path) -> Path:
    """Five novels to calibrate on (``novels/``) and *Persuasion* held out."""
    austen = ROOT.parent / "shared" / "data" / "austen"
    (folder / "novels").mkdir(parents=True, exist_ok=True)
    for novel in austen.glob("*.txt"):
        target = folder / ("persuasion.txt" if novel.name == "persuasion.txt" else "novels")
        target = target if target.suffix else target / novel.name
        target.write_bytes(novel.read_bytes())
    return folder


if __name__ == "__main__":
    main()
