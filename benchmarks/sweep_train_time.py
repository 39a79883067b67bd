"""How long a sweep's runs trained, from their metrics.jsonl: the wall time a sweep cost, even one run in parts.

    python benchmarks/sweep_train_time.py SWEEP_DIR [--out FILE.md]

A sweep that runs across several sessions has no single wall-clock span, and a run resumed after a kill re-trains
the steps since its last checkpoint. The trainer logs its throughput over every logged window, so each window took
(tokens since the previous record) / tokens_per_s seconds; their sum is the run's training time, checkpoint saves
included, evaluations (in training and the sweep's tau sweep) and re-trained steps excluded. One row per recipe run
(its learning rates and seeds summed), then the total.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from ponderlm.files import atomic_write_text, read_jsonl

RUN_DIR_NAME = re.compile(r"(?P<run>.+?)(-lr[0-9.e+-]+)?(-s\d+)?$")


def training_seconds(run_dir: Path) -> float:
    records = read_jsonl(run_dir / "metrics.jsonl")
    seconds, tokens = 0.0, 0
    for record in records:
        if "tokens_per_s" in record:
            seconds += (record["tokens"] - tokens) / record["tokens_per_s"]
            tokens = record["tokens"]
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    run_dirs = sorted(d for d in (args.sweep_dir / "runs").glob("*") if (d / "metrics.jsonl").is_file())
    if not run_dirs:
        raise SystemExit(f"{args.sweep_dir}/runs has no run with a metrics.jsonl: not a sweep's output directory")
    hours, trained = defaultdict(float), defaultdict(int)
    for run_dir in run_dirs:
        name = RUN_DIR_NAME.match(run_dir.name)["run"]
        hours[name] += training_seconds(run_dir) / 3600
        trained[name] += 1
    lines = ["```", "python benchmarks/sweep_train_time.py " + " ".join(sys.argv[1:]), "```", "",
             "| recipe run | trainings (learning rates x seeds) | training hours |", "|---|---|---|"]
    lines += [f"| {name} | {trained[name]} | {hours[name]:.2f} |" for name in hours]
    lines.append(f"| total | {sum(trained.values())} | {sum(hours.values()):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
