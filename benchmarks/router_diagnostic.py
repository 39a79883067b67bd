"""Is the PonderLM-3 router right to skip steps? Validation loss when predicting from each slot h^(k) alone.

    python benchmarks/router_diagnostic.py RUN_DIR [RUN_DIR ...] --max-tokens 32768 --out FILE.md

For each run (ponderlm3) it scores the same validation tokens with the soft training forward (attention mask from
the router, as trained) and reads the next-token loss off every slot's final-norm state h^(k), k = 0..K, beside
the router's mixture Σ_k s_k h^(k) and the mean router mass s_k. If the router puts its mass on k = 0 while
h^(K) predicts better, the router is failing; if h^(0) predicts better, skipping is the right call for this model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import describe_machine
from ponderlm.batching import eval_batches
from ponderlm.data import TokenShards
from ponderlm.files import atomic_write_text
from ponderlm.machine import autocast
from ponderlm.rundir import load


@torch.no_grad()
def diagnose(run_dir: Path, max_tokens: int) -> dict:
    model, _ = load(run_dir)
    config = model.config
    if not model.adaptive:
        raise SystemExit(f"{run_dir} is {config.method}; this diagnostic needs an adaptive method")
    steps = model.max_extra_steps
    slot_nll, mixture_nll, mass, tokens = torch.zeros(steps + 1), 0.0, torch.zeros(steps + 1), 0
    for inputs, targets in eval_batches(TokenShards(Path(config.data.path), "val"), config.data.seq_len, 16,
                                        max_tokens):
        with autocast(config, "cpu"):
            seen = model.inspect(inputs, tau=0.0)  # tau = 0 prunes nothing: the soft mask, as in training
            states, s = seen.slot_states, seen.step_distribution
            for k in range(steps + 1):
                logits = model.backbone.lm_head(states[:, :, k])
                slot_nll[k] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            mixture_nll += F.cross_entropy(seen.logits.float().flatten(0, 1), targets.flatten(),
                                           reduction="sum").item()
        mass += s.float().sum((0, 1))
        tokens += targets.numel()
    return {"run": run_dir.name, "penalty": config.ponder.penalty, "tokens": tokens,
            "slot_loss": (slot_nll / tokens).tolist(), "mixture_loss": mixture_nll / tokens,
            "router_mass": (mass / tokens).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    results = [diagnose(run, args.max_tokens) for run in args.runs]
    steps = len(results[0]["slot_loss"]) - 1
    header = ["run", "lambda"] + [f"loss from h^({k})" for k in range(steps + 1)] + ["mixture loss"] + \
             [f"router mass s_{k}" for k in range(steps + 1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["run"], f"{r['penalty']:g}"] + [f"{x:.4f}" for x in r["slot_loss"]] + \
                [f"{r['mixture_loss']:.4f}"] + [f"{x:.3f}" for x in r["router_mass"]]
        lines.append("| " + " | ".join(cells) + " |")
    report = ["# Router diagnostic: validation loss (nats) predicting from each slot alone", "",
              f"Command: `python {' '.join(sys.argv)}`",
              f"Machine: {describe_machine()}, "
              f"{results[0]['tokens']:,} validation tokens per run, {time.time() - started:.0f} s.", ""] + lines
    atomic_write_text(args.out, "\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
