"""Continued pretraining from a pretrained source (issue 33): validation loss over the first continued steps of
vanilla and of adaptive methods converted from the same weights, at several learning rates.

    .venv/bin/python benchmarks/continued_pretraining.py --source runs/cp-source --data data/default \\
        --preset small --methods vanilla,ponderlm3 --lrs 1e-4,3e-4,1e-3,3e-3 --adaptive 3e-4x1,3e-4x10,1e-3x10 \\
        --steps 200 --eval-every 25 --runs runs/cp-scan --out docs/results/continued-pretraining

(docs/results/continued-pretraining/README.md has the source's command and what the scan found.)

Every run is `train --init-from SOURCE` through the library (`ponderlm.sources.init_from_config`), fp32, router
warm-up 0 (the default), one seed. Runs live in RUNS/METHOD-lrLR and resume where they stopped, so the scan can be
stopped and restarted. Step 0 is the source itself, evaluated on the same validation tokens as every logged step (a
converted adaptive method computes what its source computes there: tests/methods/test_conversion.py).
OUT/continued.md gets the table of validation loss by step, the first logged step at which each adaptive method is
below vanilla (at the same lr, and at vanilla's best lr of that step), the command and the machine; OUT/curves.json
the numbers. Both are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ponderlm.rundir import RunDir
from ponderlm.evaluate import evaluate_run
from ponderlm.files import atomic_write_text, read_jsonl
from ponderlm.sources import import_llama, init_from_config
from ponderlm.machine import describe
from ponderlm.train import train


def run_name(method: str, lr: float, scale: float) -> str:
    return f"{method}-lr{lr:g}" + (f"-x{scale:g}" if scale != 1 else "")


def run(args, method: str, lr: float, scale: float) -> Path:
    run_dir = args.runs / run_name(method, lr, scale)
    steps = args.steps
    overrides = [f"data.path={args.data}", f"method={method}", f"train.lr={lr}", f"train.method_lr_scale={scale}",
                 f"train.steps={steps}", f"train.eval_every={args.eval_every}", f"train.save_every={args.eval_every}",
                 f"train.eval_tokens={args.eval_tokens}", "train.dtype=fp32", f"train.warmup_steps={args.warmup}",
                 *args.set]
    if not RunDir(run_dir).finished(steps):
        resume = RunDir(run_dir).holds_run()
        train(None if resume else init_from_config(args.preset, args.source, overrides), run_dir, resume=resume,
              progress=False)
    return run_dir


def scan(args) -> list[tuple[str, float, float]]:
    """(method, lr, method_lr_scale) of every run: vanilla at every lr, each adaptive method at `--adaptive`'s
    LRxSCALE pairs (default: every lr at scale 1)."""
    lrs = [float(lr) for lr in args.lrs.split(",")]
    pairs = [(float(lr), float(scale)) for lr, scale in (p.split("x") for p in args.adaptive.split(","))] \
        if args.adaptive else [(lr, 1.0) for lr in lrs]
    methods = args.methods.split(",")
    return [(m, lr, 1.0) for m in methods if m == "vanilla" for lr in lrs] + \
        [(m, lr, scale) for m in methods if m != "vanilla" for lr, scale in pairs]


def curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Validation loss and mean extra steps per token (at the run's tau) at each evaluated step."""
    records = read_jsonl(RunDir(run_dir).metrics_file)
    return {r["step"]: (r["val_loss"], r.get("val_extra_steps", 0.0)) for r in records if "val_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="a pretrained run directory or Llama folder")
    parser.add_argument("--data", type=Path, required=True, help="data prepared with the source's tokenizer")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--methods", default="vanilla,ponderlm3")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--adaptive", default="", metavar="LRxSCALE,...",
                        help="the adaptive methods' runs: backbone lr x train.method_lr_scale (default: --lrs x 1)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=20, help="train.warmup_steps of every run")
    parser.add_argument("--set", action="append", default=[], help="a further override of every run")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument("--runs", type=Path, default=Path("runs/continued-pretraining"),
                        help="where the runs go (checkpoints: not for docs/)")
    args = parser.parse_args()
    command = "python benchmarks/continued_pretraining.py " + shlex.join(sys.argv[1:])
    source_run = args.source
    if not RunDir(args.source).holds_run():  # a Llama folder: its step 0 is evaluated as an imported run
        source_run = args.runs / "source"
        if not RunDir(source_run).holds_run():
            import_llama(args.source, source_run, overrides=[f"data.path={args.data}"])
    source_loss = evaluate_run(source_run, split="val", max_tokens=args.eval_tokens, data_path=args.data)["loss"]
    curves = {}
    for spec in scan(args):
        curves[spec] = curve(run(args, *spec))
        print(f"{run_name(*spec)}: {curves[spec]}", flush=True)
        report(args, command, source_loss, curves)  # after every run: a scan runs for hours
    print(f"wrote {args.out / 'continued.md'}")


def report(args, command: str, source_loss: float, curves: dict[tuple[str, float, float], dict]) -> None:
    """OUT/continued.md and OUT/curves.json from the runs finished so far, by (method, lr, method_lr_scale)."""
    steps = sorted({step for found in curves.values() for step in found})
    lines = ["# Continued pretraining from a pretrained source", "", f"Command: `{command}`", "",
             f"Machine: {describe()}; fp32, one seed per run, validation loss on the first {args.eval_tokens} "
             f"validation tokens; each cell is the loss (mean extra steps per token at the run's tau). A run is "
             f"METHOD-lrLR[-xSCALE]: the backbone at LR, the method's own parts at LR x SCALE. Source: "
             f"`{args.source}`, validation loss {source_loss:.4f} (step 0).", "",
             "| step | " + " | ".join(run_name(*spec) for spec in curves) + " |", "|---" * (len(curves) + 1) + "|"]
    lines += [f"| {step} | " + " | ".join(f"{c[step][0]:.4f} ({c[step][1]:.2f})" if step in c else ""
                                          for c in curves.values()) + " |" for step in steps]
    vanillas = [c for (method, _, _), c in curves.items() if method == "vanilla"]
    best_vanilla = {step: min(c[step][0] for c in vanillas if step in c) for step in steps
                    if any(step in c for c in vanillas)}
    lines += ["", "First logged step at which a run's validation loss is below vanilla's at the same lr / below "
              "vanilla's best of that step:", ""]
    for (method, lr, scale), found in curves.items():
        if method == "vanilla":
            continue
        base = curves.get(("vanilla", lr, 1.0), {})
        same = next((s for s in steps if s in found and s in base and found[s][0] < base[s][0]), None)
        best = next((s for s in steps if s in found and s in best_vanilla and found[s][0] < best_vanilla[s]), None)
        found_at = " / ".join(f"step {s}" if s is not None else "not within the run" for s in (same, best))
        lines.append(f"- {run_name(method, lr, scale)}: {found_at}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "continued.md", "\n".join(lines) + "\n")
    by_name = {run_name(*spec): found for spec, found in curves.items()}
    atomic_write_text(args.out / "curves.json", json.dumps({"source_val_loss": source_loss, "curves": by_name},
                                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
