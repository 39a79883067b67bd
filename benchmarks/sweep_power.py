"""How many seeds a comparison needs: the power of Welch's t-test for a difference seen in a published sweep.

    python benchmarks/sweep_power.py RESULTS.json --mine RUN[@TAU] --other RUN[@TAU] [--alpha 0.05] [--out FILE.md]

Takes the two runs' per-seed perplexities, assumes their observed mean difference and standard deviations are the
truth (optimistic: a difference measured on 3 seeds is itself noisy), and simulates the test at 3 to 12 seeds a side
(200,000 draws per cell, a fixed generator): the share of simulated sweeps in which Welch's two-sided p falls below
alpha. Use alpha / m for a comparison Holm-adjusted in a family of m that must pass first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from ponderlm.files import atomic_write_text
from ponderlm.sweep.report import read_rows

SEEDS = (3, 4, 5, 6, 8, 10, 12)


def values(rows: list[dict], spec: str) -> list[float]:
    run, _, tau = spec.partition("@")
    found = [r["ppl"] for r in rows if r["run"] == run and (not tau or r["tau"] == float(tau))]
    if len(found) < 2:
        sys.exit(f"sweep_power: {spec} has {len(found)} seeds in the results; it needs 2 or more")
    return found


def power(mean: tuple[float, float], std: tuple[float, float], seeds: tuple[int, int], alpha: float,
          draws: int = 200_000) -> float:
    rng = np.random.default_rng(0)
    a = rng.normal(mean[0], std[0], (draws, seeds[0]))
    b = rng.normal(mean[1], std[1], (draws, seeds[1]))
    return float((stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < alpha).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--mine", required=True)
    parser.add_argument("--other", required=True)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = read_rows(Path(args.results))
    mine, other = values(rows, args.mine), values(rows, args.other)
    mean, std = (np.mean(mine), np.mean(other)), (np.std(mine, ddof=1), np.std(other, ddof=1))
    lines = [f"```\npython {' '.join(sys.argv)}\n```", "",
             f"{args.mine}: {mean[0]:.2f} +- {std[0]:.2f} ({len(mine)} seeds); {args.other}: {mean[1]:.2f} +- "
             f"{std[1]:.2f} ({len(other)} seeds); observed difference {mean[1] - mean[0]:+.2f}. Power of Welch's "
             f"test at alpha {args.alpha:g}, taking these as the truth (rows: seeds of {args.mine}, columns: seeds "
             f"of {args.other}):", "", "| seeds | " + " | ".join(map(str, SEEDS)) + " |", "|---" * (len(SEEDS) + 1) + "|"]
    for n in SEEDS[:4]:
        lines.append(f"| {n} | " + " | ".join(f"{power(mean, std, (n, m), args.alpha):.2f}" for m in SEEDS) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
