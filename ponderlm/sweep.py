"""`ponderlm sweep RECIPE.yaml --out DIR`: train every run of a recipe, evaluate all of them the same way, and write
the perplexity-versus-inference-FLOPs table and plot.

A recipe names a base config, overrides shared by every run, the runs (each a name plus its own overrides), the
evaluation split and token budget, and the tau values swept for every run of a prunable method:

    base: small
    set: [train.steps=2000]
    eval: {split: val, max_tokens: 65536}
    taus: [1.0e-4, 1.0e-2, 0.1]
    runs:
      - {name: vanilla, set: [method=vanilla]}
      - {name: ponderlm3-l1e-3, set: [method=ponderlm3, ponder.penalty=1.0e-3]}

Resumable: a finished run is not retrained, an interrupted one continues from its last checkpoint, and an
evaluation already stored in the run directory (same split, token budget and tau) is reused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ponderlm.checkpoint import latest_checkpoint, read_run_config
from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_run
from ponderlm.files import atomic_path, atomic_write_bytes, atomic_write_text
from ponderlm.methods import METHODS, build_model
from ponderlm.train import train

COLUMNS = ["method", "run", "tau", "ppl", "loss", "inference_flops_per_token", "mean_extra_steps", "train_flops",
           "train_tokens", "soft_ppl", "split", "eval_tokens"]
MARKERS = "osD^v*PXhp<>"  # one per method, in registry order


@dataclass
class Recipe:
    base: str
    runs: list[dict]
    set: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    taus: list[float] = field(default_factory=lambda: [1e-4])

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
            recipe = cls(**data)
        except (OSError, yaml.YAMLError, TypeError) as exc:
            raise PonderError(f"cannot read recipe {path}: {exc}") from None
        names = [run.get("name", "") for run in recipe.runs]
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9._-]+", str(n))]
        if bad or len(set(names)) != len(names) or not names:
            raise PonderError(f"recipe {path}: every run needs a unique name of letters, digits, '.', '_', '-'")
        unknown = set(recipe.eval) - {"split", "max_tokens"}
        if unknown:
            raise PonderError(f"recipe {path}: unknown eval keys {sorted(unknown)} (known: split, max_tokens)")
        return recipe

    def config(self, run: dict):
        return load_config(self.base, [*self.set, *run.get("set", [])])


def _finished(run_dir: Path, steps: int) -> bool:
    checkpoint = latest_checkpoint(run_dir)
    return checkpoint is not None and int(checkpoint.name.split("_")[1]) >= steps


def _evaluate(run_dir: Path, split: str, max_tokens: int | None, tau: float | None, with_soft: bool) -> dict:
    """Evaluate once and store the result in the run directory, keyed by what was asked."""
    store = run_dir / "sweep_eval.json"
    stored = json.loads(store.read_text()) if store.exists() else {}
    checkpoint = latest_checkpoint(run_dir).name
    key = f"{checkpoint}|{split}|{max_tokens}|{tau}|{with_soft}"
    if key not in stored:
        stored[key] = evaluate_run(run_dir, split=split, max_tokens=max_tokens, tau=tau, with_soft=with_soft)
        atomic_write_text(store, json.dumps(stored, indent=1))
    return stored[key]


def run_sweep(recipe_path: Path, out: Path, progress: bool | None = None) -> list[dict]:
    recipe = Recipe.load(recipe_path)
    configs = {run["name"]: recipe.config(run) for run in recipe.runs}  # validate everything before training
    split, max_tokens = recipe.eval.get("split", "val"), recipe.eval.get("max_tokens")
    rows = []
    for name, config in configs.items():
        run_dir = out / "runs" / name
        if not _finished(run_dir, config.train.steps):
            resume = (run_dir / "config.yaml").is_file()
            train(None if resume else config, run_dir, resume=resume, progress=progress)
        config = read_run_config(run_dir)
        model = build_model(config)
        train_tokens = config.train.steps * (config.train.batch_tokens // config.data.seq_len) * config.data.seq_len
        train_flops = model.training_flops_per_token() * train_tokens
        soft_ppl = ""
        for index, tau in enumerate(recipe.taus if model.prunable else [None]):
            # The soft loss does not depend on tau: compute it with the first tau only.
            result = _evaluate(run_dir, split, max_tokens, tau, with_soft=index == 0)
            soft_ppl = result.get("soft_ppl", soft_ppl)
            rows.append({"method": config.method, "run": name, "tau": "" if tau is None else tau,
                         "ppl": result["ppl"], "loss": result["loss"],
                         "inference_flops_per_token": result["inference_flops_per_token"],
                         "mean_extra_steps": result["mean_extra_steps"], "train_flops": train_flops,
                         "train_tokens": train_tokens, "soft_ppl": soft_ppl, "split": split,
                         "eval_tokens": result["tokens"]})
    write_results(rows, out)
    return rows


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both FLOPs and perplexity, by increasing FLOPs."""
    best, kept = math.inf, []
    for flops, ppl in sorted(points):
        if ppl < best:
            kept.append((flops, ppl))
            best = ppl
    return kept


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", table.getvalue().encode())
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    lines = ["| method | run | tau | ppl | inference GFLOPs/token | mean extra steps | training PFLOPs |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["inference_flops_per_token"]):
        lines.append(f"| {r['method']} | {r['run']} | {r['tau']} | {r['ppl']:.2f} | "
                     f"{r['inference_flops_per_token'] / 1e9:.4f} | {r['mean_extra_steps']:.2f} | "
                     f"{r['train_flops'] / 1e15:.4f} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(rows, out / "pareto.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(r["inference_flops_per_token"] for r in rows)
    scale, unit = (1e9, "GFLOPs") if largest >= 1e9 else (1e6, "MFLOPs")
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    for index, method in enumerate(METHODS):
        points = [(r["inference_flops_per_token"] / scale, r["ppl"]) for r in rows if r["method"] == method]
        if not points:
            continue
        line = ax.plot(*zip(*frontier(points)), "-", alpha=0.6)[0]
        ax.scatter(*zip(*points), marker=MARKERS[index % len(MARKERS)], s=60, color=line.get_color(), label=method,
                   zorder=3)
    ax.set_xlabel(f"inference FLOPs per token ({unit}, analytic, slots actually run)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs inference compute (lines: each method's frontier)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
