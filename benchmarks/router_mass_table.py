"""How an adaptive run's step distribution moves during training: the mean router mass on each k, from metrics.jsonl.

    python benchmarks/router_mass_table.py RUN_DIR [RUN_DIR ...] [--every 40] [--out FILE.md]

For each run (ponderlm3 or halting: any run that logs `step_mass_k`), one row per logged step that is a multiple of
--every (and the last), with the training loss, the mass on every k and the expected extra steps. Reads only the
metrics the trainer logged (every `train.log_every` steps, averaged over that step's batch), so it costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ponderlm.files import atomic_write_text, read_jsonl


def mass_rows(run_dir: Path, every: int) -> list[dict]:
    records = read_jsonl(run_dir / "metrics.jsonl")
    logged = [r for r in records if "step_mass_0" in r]
    if not logged:
        raise SystemExit(f"{run_dir} logs no step_mass_k: not an adaptive run")
    return [r for r in logged if r["step"] % every == 0 or r is logged[-1]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = ["```", "python benchmarks/router_mass_table.py " + " ".join(sys.argv[1:]), "```", ""]
    for run_dir in args.run_dirs:
        rows = mass_rows(run_dir, args.every)
        masses = sorted(key for key in rows[0] if key.startswith("step_mass_"))
        lines += [f"`{run_dir}`", "", "| step | train loss | " + " | ".join(f"s_{m.rsplit('_', 1)[1]}" for m in masses)
                  + " | expected extra steps |", "|---|---|" + "---|" * (len(masses) + 1)]
        lines += [f"| {r['step']} | {r['loss']:.3f} | " + " | ".join(f"{r[m]:.3f}" for m in masses)
                  + f" | {r['expected_extra_steps']:.3f} |" for r in rows] + [""]
    text = "\n".join(lines)
    if args.out:
        atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
