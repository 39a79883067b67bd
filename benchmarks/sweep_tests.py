"""Welch's and the paired t-test between any two runs of published sweeps: the test behind a sentence in a README.

    python benchmarks/sweep_tests.py RESULTS.json [RESULTS.json ...] --pair MINE OTHER [--pair ...] [--out FILE.md]

A run is RUN or RUN@TAU (a prunable run's evaluation at that tau), looked up in every results.json given (the first
that has it); A~B is the per-seed difference A - B over the seeds both ran (e.g. RUN@0.99~RUN@0.0001: what running
the latent steps buys each seed), so --pair X@0.99~X@0.0001 Y@0.99~Y@0.0001 tests whether Y's latent steps buy more.
Each pair gives OTHER's mean perplexity minus MINE's (positive: MINE lower), its 95 % Welch interval, t with the
Welch-Satterthwaite degrees of freedom, the two-sided p, and the paired test over the seeds both ran. The p-values are
not adjusted: a sentence that quotes several says how many it tested.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ponderlm.files import atomic_write_text
from ponderlm.sweep.report import read_rows
from ponderlm.sweep.stats import paired, welch


def seeds_of(tables: list[list[dict]], spec: str) -> dict[int, float]:
    if "~" in spec:
        minuend, subtrahend = (seeds_of(tables, part) for part in spec.split("~", 1))
        shared = sorted(set(minuend) & set(subtrahend))
        if not shared:
            sys.exit(f"sweep_tests: the two sides of {spec} share no seed")
        return {seed: minuend[seed] - subtrahend[seed] for seed in shared}
    run, _, tau = spec.partition("@")
    for rows in tables:
        found = {r["seed"]: r["ppl"] for r in rows if r["run"] == run and r["tau"] == (float(tau) if tau else None)}
        if found:
            return found
    sys.exit(f"sweep_tests: no run {spec} in the results given")


def describe(values: dict[int, float]) -> str:
    mean = statistics.mean(values.values())
    spread = f" +- {statistics.stdev(values.values()):.2f}" if len(values) > 1 else ""
    return f"{mean:.2f}{spread} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("MINE", "OTHER"))
    parser.add_argument("--out")
    args = parser.parse_args()
    tables = [read_rows(Path(path)) for path in args.results]
    lines = [f"```\npython {' '.join(sys.argv)}\n```", "",
             "| mine | ppl (seeds) | other | ppl (seeds) | difference | 95 % interval | t (df) | p (Welch) | "
             "paired: difference, p (seeds) |", "|---" * 9 + "|"]
    for mine_spec, other_spec in args.pair:
        mine, other = seeds_of(tables, mine_spec), seeds_of(tables, other_spec)
        test, pairs = welch(list(mine.values()), list(other.values())), paired(mine, other)
        difference = statistics.mean(other.values()) - statistics.mean(mine.values())
        tested = (f"[{test.low:+.2f}, {test.high:+.2f}] | {test.t:.2f} ({test.df:.1f}) | {test.p:.3f}" if test
                  else "one seed: not tested | | ")
        paired_text = f"{pairs.difference:+.2f}, {pairs.p:.3f} ({pairs.n})" if pairs else ""
        lines.append(f"| {mine_spec} | {describe(mine)} | {other_spec} | {describe(other)} | {difference:+.2f} | "
                     f"{tested} | {paired_text} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
