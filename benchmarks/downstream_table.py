"""Zero-shot downstream table for every run of a sweep: accuracy, mean extra steps and inference FLOPs per token.

    python benchmarks/downstream_table.py sweeps/pareto-cpu --limit 300 --out docs/results/pareto-cpu/downstream.md

Needs `ponderlm benchmarks fetch` first. Each run is evaluated with `ponderlm lm-eval`'s code path (its JSON lands
in the run directory); ponderlm3 runs at their own tau and, with --tau, at that tau too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lm_eval.utils import handle_non_serializable

from machine import describe_machine
from ponderlm.rundir import RunDir
from ponderlm.downstream import TASKS, UNAVAILABLE, run_lm_eval
from ponderlm.files import atomic_write_text
from ponderlm.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--limit", type=int, default=300, help="documents per task (default 300)")
    parser.add_argument("--tau", type=float, action="append", default=[], help="extra tau for ponderlm3 runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.time()
    rows = []
    for run_dir in sorted(p for p in (args.sweep_dir / "runs").iterdir() if RunDir(p).holds_run()):
        run = RunDir(run_dir)
        config = run.read_config()
        if not run.finished(config.train.steps):
            print(f"{run_dir.name}: still training, left out", file=sys.stderr)
            continue
        checkpoint = run.latest_checkpoint()
        for tau in [None] + (args.tau if METHODS[config.method].prunable else []):
            # Stored per run, so the script can run while a sweep trains and only evaluates what is new.
            store = run.report_file(f"downstream_{checkpoint.name}_limit{args.limit}_tau{tau}.json")
            if not store.exists():
                results = run_lm_eval(run_dir, list(TASKS), limit=args.limit, tau=tau, progress=False)
                atomic_write_text(store, json.dumps(results, default=handle_non_serializable))
            rows.append((run_dir.name, json.loads(store.read_text())))
            print(f"{run_dir.name} tau={tau}: done", file=sys.stderr, flush=True)

    header = ["run", "method", "tau"] + list(TASKS) + ["race", "mean extra steps", "inference FLOPs/token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, results in rows:
        info = results["ponderlm"]
        cells = [name, info["method"], "-" if info["tau"] is None else f"{info['tau']:g}"]
        for task in TASKS:
            metrics = results["results"][f"ponderlm_{task}"]
            cells.append(f"{metrics.get('acc_norm,none', metrics['acc,none']):.3f}")
        cells.append("n/a")
        tokens = sum(c["tokens"] for c in info["compute"].values())
        steps = sum(c["mean_extra_steps"] * c["tokens"] for c in info["compute"].values()) / tokens
        flops = sum(c["inference_flops_per_token"] * c["tokens"] for c in info["compute"].values()) / tokens
        cells += [f"{steps:.2f}", f"{flops:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    command = " ".join(["python"] + sys.argv)
    minutes = (time.time() - started) / 60
    report = [f"# Zero-shot downstream accuracy ({args.limit} documents per task)", "",
              f"Command: `{command}`", f"Machine: {describe_machine()}; this invocation {minutes:.0f} min (runs evaluated by an earlier "
              "invocation are read from their cached JSON in the run directory).", "",
              f"Evaluated runs: {len(rows)}.", "",
              "acc_norm where the task has it (ARC, HellaSwag, PIQA, SciQ), else acc (LAMBADA, WinoGrande). "
              f"RACE: {UNAVAILABLE['race']}. Mean extra steps and FLOPs are averaged over every token the tasks "
              "ran through the model.", ""] + lines
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(report) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
