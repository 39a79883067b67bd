"""Continued pretraining from a pretrained source (issue 33): validation loss over the first continued steps of
vanilla and of adaptive methods converted from the same weights, at several learning rates.

    .venv/bin/python benchmarks/continued_pretraining.py --source runs/vanilla-long --data data/default \\
        --preset small --methods vanilla,ponderlm3 --lrs 3e-4,1e-3,3e-3 --steps 300 --eval-every 25 \\
        --out docs/results/continued-pretraining

Every run is `train --init-from SOURCE` through the library (`ponderlm.sources.init_from_config`), fp32, router warm-up
0, one seed. Runs live in OUT/runs and resume where they stopped, so the scan can be stopped and restarted. Step 0
is the source itself, evaluated on the same validation tokens as every logged step (a converted adaptive method
computes what its source computes there: tests/methods/test_conversion.py). OUT/continued.md gets the table of
validation loss by step, the first logged step at which each adaptive method is below vanilla at the same lr, the
command and the machine; OUT/curves.json the numbers.
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


def run(args, method: str, lr: float) -> Path:
    run_dir = args.out / "runs" / f"{method}-lr{lr:g}"
    steps = args.steps
    overrides = [f"data.path={args.data}", f"method={method}", f"train.lr={lr}", f"train.steps={steps}",
                 f"train.eval_every={args.eval_every}", f"train.save_every={args.eval_every}",
                 f"train.eval_tokens={args.eval_tokens}", "train.dtype=fp32", "ponder.router_warmup_steps=0",
                 f"train.warmup_steps={args.warmup}", *args.set]
    if not RunDir(run_dir).finished(steps):
        resume = RunDir(run_dir).holds_run()
        train(None if resume else init_from_config(args.preset, args.source, overrides), run_dir, resume=resume,
              progress=False)
    return run_dir


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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=20, help="train.warmup_steps of every run")
    parser.add_argument("--set", action="append", default=[], help="a further override of every run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    command = "python benchmarks/continued_pretraining.py " + shlex.join(sys.argv[1:])
    methods, lrs = args.methods.split(","), [float(lr) for lr in args.lrs.split(",")]
    source_run = args.source
    if not RunDir(args.source).holds_run():  # a Llama folder: its step 0 is evaluated as an imported run
        source_run = args.out / "runs" / "source"
        if not RunDir(source_run).holds_run():
            import_llama(args.source, source_run, overrides=[f"data.path={args.data}"])
    source_loss = evaluate_run(source_run, split="val", max_tokens=args.eval_tokens, data_path=args.data)["loss"]
    curves = {}
    for lr in lrs:
        for method in methods:
            curves[f"{method}-lr{lr:g}"] = curve(run(args, method, lr))
            print(f"{method} lr {lr:g}: {curves[f'{method}-lr{lr:g}']}", flush=True)
    steps = sorted({step for found in curves.values() for step in found})
    lines = ["# Continued pretraining from a pretrained source", "", f"Command: `{command}`", "",
             f"Machine: {describe()}; fp32, one seed per run, validation loss on the first {args.eval_tokens} "
             f"validation tokens; each cell is the loss (mean extra steps per token at the run's tau). Source: "
             f"`{args.source}`, validation loss {source_loss:.4f} (step 0).", "",
             "| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    lines += [f"| {step} | " + " | ".join(f"{c[step][0]:.4f} ({c[step][1]:.2f})" if step in c else ""
                                          for c in curves.values()) + " |" for step in steps]
    lines += ["", "First logged step at which a method's validation loss is below vanilla's at the same lr:", ""]
    for lr in lrs:
        base = curves.get(f"vanilla-lr{lr:g}", {})
        for method in (m for m in methods if m != "vanilla"):
            found = curves[f"{method}-lr{lr:g}"]
            below = next((s for s in steps if s in found and s in base and found[s][0] < base[s][0]), None)
            lines.append(f"- {method}, lr {lr:g}: " + (f"step {below}" if below is not None else "not within the run"))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "continued.md", "\n".join(lines) + "\n")
    atomic_write_text(args.out / "curves.json", json.dumps({"source_val_loss": source_loss, "curves": curves},
                                                           indent=1) + "\n")
    print(f"wrote {args.out / 'continued.md'}")


if __name__ == "__main__":
    main()
