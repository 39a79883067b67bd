"""How a gap between two methods moves with data: their in-training validation perplexity, mean over seeds, per step.

    python benchmarks/val_curve_table.py 'SWEEP/runs/vanilla-4x-lr0.012-s*' 'SWEEP/runs/ponderlm3-l1e-3-4x-lr0.012-s*'
        [--out FILE.md]

Each argument is a glob naming one group of runs (the seeds of one configuration). Reads the `val_ppl` the trainer
logged every `train.eval_every` steps (on the run's own `train.eval_tokens` validation tokens, through the method's
inference path at its configured tau), so it costs nothing. One row per evaluated step that every run reached: each
group's mean +- std over its runs, then the first group's mean minus the second's, in perplexity and in nats (the
mean validation loss, which is what a gap "with data" should be compared in: perplexity differences shrink with
the perplexity itself).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

from ponderlm.files import atomic_write_text, read_jsonl


def val_records(run_dir: Path) -> dict[int, dict]:
    """step -> the record logged at that step with a val_ppl."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    return {r["step"]: r for r in records if "val_ppl" in r}


def group_runs(pattern: str) -> list[Path]:
    runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").is_file())
    if not runs:
        raise SystemExit(f"{pattern} matches no run directory with a metrics.jsonl")
    return runs


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {std:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs=2, metavar="GLOB", help="the run directories of one group (quote it)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    groups = [[val_records(run) for run in group_runs(pattern)] for pattern in args.groups]
    steps = sorted(set.intersection(*(set(records) for group in groups for records in group)))
    if not steps:
        raise SystemExit("the runs share no evaluated step: compare runs with the same train.eval_every")
    first, second = (Path(p).name for p in args.groups)
    command = " ".join(f"'{arg}'" if "*" in arg else arg for arg in sys.argv[1:])
    lines = ["```", f"python benchmarks/val_curve_table.py {command}", "```", "",
             f"`{first}` ({len(groups[0])} runs) against `{second}` ({len(groups[1])} runs):", "",
             f"| step | train tokens (M) | {first} | {second} | difference (ppl) | difference (nats) |",
             "|---|---|---|---|---|---|"]
    for step in steps:
        ppl = [[records[step]["val_ppl"] for records in group] for group in groups]
        loss = [[records[step]["val_loss"] for records in group] for group in groups]
        tokens = groups[0][0][step]["tokens"] / 1e6
        lines.append(f"| {step} | {tokens:.2f} | {mean_std(ppl[0])} | {mean_std(ppl[1])} | "
                     f"{statistics.mean(ppl[0]) - statistics.mean(ppl[1]):+.1f} | "
                     f"{statistics.mean(loss[0]) - statistics.mean(loss[1]):+.3f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")


if __name__ == "__main__":
    main()
