"""`ponderlm sweep RECIPE.yaml --out DIR`: train every run of a recipe, evaluate all of them the same way, and write
the perplexity-versus-inference-FLOPs table and plot.

A recipe names a base config, overrides shared by every run, the runs (each a name plus its own overrides), the
evaluation split, token budget and scoring (`exact` by default, `jacobi` for the parallel forward: see
`ponderlm eval --scoring`), the tau values swept for every run of a prunable method, and optionally the
protocol that makes a comparison believable: a learning-rate grid (each run trains at every lr with its first seed
and keeps the lr with the lowest evaluation loss, at the first tau for prunable methods; `lr_search: local` walks
from the middle of the grid toward lower loss instead, and stops where both neighbours are worse) and seeds (every
run repeated; the table and plot give mean +- std over seeds, results.csv one row per seed):

    base: small
    set: [train.steps=2000]
    eval: {split: val, max_tokens: 65536}
    taus: [1.0e-4, 1.0e-2, 0.1]
    lrs: [1.0e-3, 3.0e-3, 6.0e-3]
    seeds: [0, 1, 2]
    runs:
      - {name: vanilla, set: [method=vanilla]}
      - {name: pause, set: [method=pause], seeds: [0]}    # a run may override lrs and seeds
      - {name: ponderlm3-l1e-3, set: [method=ponderlm3, ponder.penalty=1.0e-3]}
      - {name: ponderlm3-l1e-3-4x, set: [method=ponderlm3, train.steps=8000], lr_from: ponderlm3-l1e-3}

`lr_from` reuses the learning rate an earlier run chose (a longer budget need not search again). With
`compare_to: ponderlm3`, results.md also says whether that method is better, worse or within seed noise at equal
data (same training tokens, no more inference FLOPs) and at equal compute (no more training and inference FLOPs).

Every run's first seed comes first, in recipe order, then the other seeds that still have to train: a long sweep
publishes a one-seed picture of every run before it adds seeds. The tables list runs in recipe order.

Resumable: the tables are rewritten after every run, a finished run is not retrained, an interrupted one continues
from its last checkpoint, and an evaluation already stored in the run directory (same split, token budget and tau)
is reused. `--reuse DIR` takes the runs (and learning-rate search losses) a published sweep directory holds in its
results.json and lr_search.json instead of training them again, for a run with no directory under --out: a sweep
whose run directories were lost, or that moves to another machine, continues from what it published. A
timestamped line per run goes to stderr as it starts (or resumes) and ends.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ponderlm.checkpoint import latest_checkpoint, read_run_config
from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_run
from ponderlm.files import atomic_path, atomic_write_bytes, atomic_write_text
from ponderlm.machine import session_summary
from ponderlm.methods import METHODS, build_model
from ponderlm.train import config_changes, train

COLUMNS = ["method", "run", "seed", "lr", "tau", "ppl", "loss", "inference_flops_per_token", "mean_extra_steps",
           "train_flops", "train_tokens", "soft_ppl", "split", "eval_tokens", "scoring", "precision", "cpu",
           "cpu_capability", "torch", "threads", "train_seconds"]
# What each run ran with (ponderlm/machine.py): empty for the published runs of sweeps from before it was recorded.
RECORDED = ("precision", "cpu", "cpu_capability", "torch", "threads", "train_seconds")
MARKERS = "osD^v*PXhp<>"  # one per method, in registry order


@dataclass
class Recipe:
    base: str
    runs: list[dict]
    set: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    taus: list[float] = field(default_factory=lambda: [1e-4])
    lrs: list[float] = field(default_factory=list)  # empty: every run at its config's train.lr
    seeds: list[int] = field(default_factory=list)  # empty: every run once, at its config's train.seed
    compare_to: str = ""  # a method: results.md then says where it is better beyond seed noise
    lr_search: str = "grid"  # grid: train at every lr; local: walk from the middle of the grid toward lower loss

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
        unknown = set(recipe.eval) - {"split", "max_tokens", "scoring"}
        if unknown:
            raise PonderError(f"recipe {path}: unknown eval keys {sorted(unknown)} (known: split, max_tokens, scoring)")
        unknown = {key for run in recipe.runs for key in run} - {"name", "set", "lrs", "seeds", "lr_from"}
        if unknown:
            raise PonderError(f"recipe {path}: unknown run keys {sorted(unknown)} "
                              "(known: name, set, lrs, seeds, lr_from)")
        if recipe.lr_search not in ("grid", "local"):
            raise PonderError(f"recipe {path}: lr_search is {recipe.lr_search!r}; use grid or local")
        if recipe.compare_to and recipe.compare_to not in METHODS:
            raise PonderError(f"recipe {path}: compare_to {recipe.compare_to!r} is not a method "
                              f"(known: {', '.join(METHODS)})")
        for index, run in enumerate(recipe.runs):
            if "lr_from" in run and run["lr_from"] not in names[:index]:
                raise PonderError(f"recipe {path}: run {run['name']} takes lr_from {run['lr_from']!r}, which is not "
                                  "an earlier run")
        try:  # YAML reads 1e-3 (no dot) as a string
            recipe.lrs, recipe.seeds = [float(x) for x in recipe.lrs], [int(x) for x in recipe.seeds]
            for run in recipe.runs:
                run.update({key: [kind(x) for x in run[key]] for key, kind in (("lrs", float), ("seeds", int))
                            if key in run})
        except (TypeError, ValueError) as exc:
            raise PonderError(f"recipe {path}: lrs must be numbers and seeds integers ({exc})") from None
        return recipe

    def config(self, run: dict, lr: float | None = None, seed: int | None = None):
        extra = ([f"train.lr={lr}"] if lr is not None else []) + ([f"train.seed={seed}"] if seed is not None else [])
        return load_config(self.base, [*self.set, *run.get("set", []), *extra])

    def grid(self, run: dict, chosen: dict[str, float | None]) -> tuple[list[float | None], list[int | None]]:
        """The learning rates to choose from and the seeds to run (None: the config's own value)."""
        lrs = [chosen[run["lr_from"]]] if "lr_from" in run else list(run.get("lrs", self.lrs)) or [None]
        return lrs, list(run.get("seeds", self.seeds)) or [None]


def run_dir_name(name: str, lr: float | None, seed: int | None) -> str:
    return name + (f"-lr{lr:g}" if lr is not None else "") + (f"-s{seed}" if seed is not None else "")


def _finished(checkpoint: Path | None, steps: int) -> bool:
    return checkpoint is not None and int(checkpoint.name.split("_")[1]) >= steps


def _evaluate(run_dir: Path, split: str, max_tokens: int | None, tau: float | None, with_soft: bool,
              scoring: str) -> dict:
    """Evaluate once and store the result in the run directory, keyed by what was asked."""
    store = run_dir / "sweep_eval.json"
    stored = json.loads(store.read_text()) if store.exists() else {}
    checkpoint = latest_checkpoint(run_dir).name
    key = f"{checkpoint}|{split}|{max_tokens}|{tau}|{with_soft}" + ("" if scoring == "jacobi" else f"|{scoring}")
    if key not in stored:
        stored[key] = evaluate_run(run_dir, split=split, max_tokens=max_tokens, tau=tau, with_soft=with_soft,
                                   scoring=scoring)
        atomic_write_text(store, json.dumps(stored, indent=1))
    return stored[key]


class Published:
    """A published sweep directory (results.json, lr_search.json): a run found there and with no directory under the
    sweep's own `runs` is taken, not trained again."""

    def __init__(self, directory: Path, runs: Path):
        self.directory, self.runs = Path(directory), runs
        try:
            self.rows = json.loads((self.directory / "results.json").read_text())
            search = self.directory / "lr_search.json"
            self.search = json.loads(search.read_text()) if search.exists() else []
        except (OSError, ValueError) as exc:
            raise PonderError(f"--reuse {directory}: cannot read its results ({exc})") from None

    def _matching(self, records: list[dict], name: str, lr: float | None, seed: int | None) -> list[dict]:
        if (self.runs / run_dir_name(name, lr, seed)).exists():
            return []
        return [r for r in records if r["run"] == name and (lr is None or r["lr"] == lr)
                and (seed is None or r["seed"] == seed)]

    def rows_of(self, name: str, lr: float | None, seed: int | None) -> list[dict]:
        return self._matching(self.rows, name, lr, seed)

    def loss_of(self, name: str, lr: float, seed: int | None) -> float | None:
        found = self._matching(self.search, name, lr, seed)
        return found[0]["loss"] if found else None


def run_sweep(recipe_path: Path, out: Path, progress: bool | None = None, reuse: Path | None = None) -> list[dict]:
    recipe = Recipe.load(recipe_path)
    for run in recipe.runs:  # validate every config before training anything
        lrs, seeds = recipe.grid(run, chosen={name: None for name in (r["name"] for r in recipe.runs)})
        for lr in lrs:
            for seed in seeds:
                recipe.config(run, lr, seed)
    published = Published(reuse, out / "runs") if reuse else None
    search, chosen, done, waiting = [], {}, {}, []

    def train_and_evaluate(run, lr, seed, first_tau_only=False):
        return _train_and_evaluate(recipe, run, lr, seed, out, progress, published, first_tau_only)

    def rows():  # in recipe order, whatever order they ran in
        return [row for key in sorted(done) for row in done[key]]

    def add(key, run, lr, seed):
        done[key] = train_and_evaluate(run, lr, seed)
        write_results(rows(), out, search, recipe.compare_to)  # after every run, so a long sweep can publish its part

    for index, run in enumerate(recipe.runs):
        lrs, seeds = recipe.grid(run, chosen)
        lr = lrs[0]
        if len(lrs) > 1:
            def loss_at(lr):
                loss = published.loss_of(run["name"], lr, seeds[0]) if published else None
                if loss is None:
                    loss = train_and_evaluate(run, lr, seeds[0], first_tau_only=True)[0]["loss"]
                search.append({"run": run["name"], "seed": seeds[0], "lr": lr, "loss": loss})
                return loss
            lr = search_lr(lrs, loss_at, local=recipe.lr_search == "local")
            if lr in (min(lrs), max(lrs)):
                _log(f"{run['name']} chose lr {lr:g}, the edge of its grid {sorted(lrs)}: the optimum may lie "
                     "outside it; extend lrs")
        chosen[run["name"]] = lr
        for position, seed in enumerate(seeds):
            # A seed that still has to train waits until every run has its first seed in: the table has every run early.
            if position == 0 or _trained(recipe, run, lr, seed, out, published):
                add((index, position), run, lr, seed)
            else:
                waiting.append(((index, position), run, lr, seed))
    for key, run, lr, seed in waiting:
        add(key, run, lr, seed)
    return rows()


def _trained(recipe: Recipe, run: dict, lr: float | None, seed: int | None, out: Path,
             published: Published | None) -> bool:
    """Whether a run needs no more training: finished under `out`, or published."""
    if published is not None and published.rows_of(run["name"], lr, seed):
        return True
    return _finished(latest_checkpoint(out / "runs" / run_dir_name(run["name"], lr, seed)),
                     recipe.config(run, lr, seed).train.steps)


def search_lr(lrs: list[float], loss_at, local: bool) -> float:
    """The learning rate of the grid with the lowest loss_at(lr).

    `local` starts in the middle of the sorted grid and moves to a better neighbour until both neighbours are worse:
    the grid's best when loss is unimodal in lr (as it is in every search this project has run), in about half the
    runs when the best lies near the middle."""
    if not local:
        return min(lrs, key=loss_at)
    lrs, losses = sorted(lrs), {}

    def loss(index):
        if index not in losses:
            losses[index] = loss_at(lrs[index])
        return losses[index]
    best = (len(lrs) - 1) // 2
    loss(best)  # the middle first, so the search's table reads outward from it
    while True:
        step = min((i for i in (best - 1, best + 1) if 0 <= i < len(lrs)), key=loss)
        if loss(step) >= loss(best):
            return lrs[best]
        best = step


def _train_and_evaluate(recipe: Recipe, run: dict, lr: float | None, seed: int | None, out: Path,
                        progress: bool | None, published: Published | None = None,
                        first_tau_only: bool = False) -> list[dict]:
    """Train one run (or resume it, or find it finished, or take it from `published`) and evaluate it: a row per tau,
    the run's tau first.

    The learning-rate search compares the first tau only, so a learning rate that loses is not evaluated at the
    others."""
    config = recipe.config(run, lr, seed)
    run_dir = out / "runs" / run_dir_name(run["name"], lr, seed)
    if published is not None and (found := published.rows_of(run["name"], lr, seed)):
        return _reused(recipe, config, found, published.directory, run_dir.name, first_tau_only)
    resume = (run_dir / "config.yaml").is_file()
    if resume and (changed := config_changes(read_run_config(run_dir), config)):
        raise PonderError(f"{run_dir} was trained with another config than the recipe now gives it ({changed}); "
                          "sweep into a new --out, or delete that run directory to retrain it")
    started = time.monotonic()
    checkpoint = latest_checkpoint(run_dir)
    trained_now = not _finished(checkpoint, config.train.steps)
    if trained_now:
        _log(f"{run_dir.name}: training" + (f", resuming from {checkpoint.name}" if checkpoint else ""))
        train(None if resume else config, run_dir, resume=resume, progress=progress)
    config = read_run_config(run_dir)  # as trained: training sets model.vocab_size from the tokenizer
    model = build_model(config)
    train_tokens = _train_tokens(config)
    train_flops = model.training_flops_per_token() * train_tokens
    split, max_tokens = recipe.eval.get("split", "val"), recipe.eval.get("max_tokens")
    rows, soft_ppl = [], ""
    ran = session_summary(run_dir)
    taus = (recipe.taus[:1] if first_tau_only else recipe.taus) if model.prunable else [None]
    for index, tau in enumerate(taus):
        # The soft loss does not depend on tau: compute it with the first tau only.
        result = _evaluate(run_dir, split, max_tokens, tau, with_soft=index == 0,
                           scoring=recipe.eval.get("scoring", "exact"))
        soft_ppl = result.get("soft_ppl", soft_ppl)
        rows.append({"method": config.method, "run": run["name"], "seed": config.train.seed, "lr": config.train.lr,
                     "tau": "" if tau is None else tau, "ppl": result["ppl"], "loss": result["loss"],
                     "inference_flops_per_token": result["inference_flops_per_token"],
                     "mean_extra_steps": result["mean_extra_steps"], "train_flops": train_flops,
                     "train_tokens": train_tokens, "soft_ppl": soft_ppl, "split": split,
                     "eval_tokens": result["tokens"], "scoring": result.get("scoring", "jacobi"),
                     **{key: ran.get(key, "") for key in RECORDED}})
    _log(f"{run_dir.name}: ppl {rows[0]['ppl']:.2f}" + (f" at tau {taus[0]:g}" if taus[0] is not None else "")
         + f" ({(time.monotonic() - started) / 60:.1f} min{'' if trained_now else ', trained earlier'})")
    return rows


def _train_tokens(config) -> int:
    return config.train.steps * (config.train.batch_tokens // config.data.seq_len) * config.data.seq_len


def _reused(recipe: Recipe, config, found: list[dict], directory: Path, name: str,
            first_tau_only: bool) -> list[dict]:
    """A published run's rows, in the recipe's tau order, once they are shown to be what the recipe asks for."""
    split = recipe.eval.get("split", "val")
    by_tau = {r["tau"]: r for r in found}
    taus = [""] if set(by_tau) == {""} else recipe.taus[:1] if first_tau_only else recipe.taus
    asked = {"method": config.method, "train_tokens": _train_tokens(config), "split": split}
    differ = {key: (found[0][key], value) for key, value in asked.items() if found[0][key] != value}
    if differ or set(taus) - set(by_tau):
        detail = ", ".join(f"{key}: {a} -> {b}" for key, (a, b) in differ.items()) or \
            f"taus {sorted(set(taus) - set(by_tau))} were not evaluated"
        raise PonderError(f"{name} in {directory}/results.json is not what the recipe asks for ({detail}); "
                          "drop --reuse to train it again")
    _log(f"{name}: ppl {by_tau[taus[0]]['ppl']:.2f} (published in {directory})")
    return [by_tau[tau] for tau in taus]


def _log(message: str) -> None:
    """A line per run on stderr, with the time: a sweep runs for hours, usually with its output in a file."""
    print(f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {message}", file=sys.stderr, flush=True)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (run, tau): the mean over seeds of every number, and the std (n - 1) of the perplexity."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["tau"]), []).append(row)
    merged = []
    for members in groups.values():
        ppl = [r["ppl"] for r in members]
        mean = sum(ppl) / len(ppl)
        std = math.sqrt(sum((p - mean) ** 2 for p in ppl) / (len(ppl) - 1)) if len(ppl) > 1 else 0.0
        numbers = {key: sum(r[key] for r in members) / len(members)
                   for key in ("inference_flops_per_token", "mean_extra_steps", "train_flops")}
        merged.append({**members[0], **numbers, "ppl": mean, "ppl_std": std, "seeds": len(members)})
    return merged


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both FLOPs and perplexity, by increasing FLOPs."""
    best, kept = math.inf, []
    for flops, ppl in sorted(points):
        if ppl < best:
            kept.append((flops, ppl))
            best = ppl
    return kept


FLOPS_TOLERANCE = 0.01  # "no more FLOPs" allows 1 %, so a router's own cost does not exclude a point


def _no_costlier(point: dict, than: dict, cost: str) -> bool:
    return point[cost] <= than[cost] * (1 + FLOPS_TOLERANCE)


def _gap(mine: dict, other: dict) -> dict:
    """other's mean perplexity minus mine, its standard error over seeds and the verdict from my side (better or
    worse by more than 2 standard errors, else within noise). A side of one seed borrows the other's seed variance;
    when both have one seed there is no spread to judge by."""
    def variance(side, else_side):
        return (side if side["seeds"] > 1 else else_side)["ppl_std"] ** 2

    error = math.sqrt(variance(mine, other) / mine["seeds"] + variance(other, mine) / other["seeds"])
    difference = other["ppl"] - mine["ppl"]
    verdict = ("one seed" if max(mine["seeds"], other["seeds"]) < 2 else "better" if difference > 2 * error
               else "worse" if difference < -2 * error else "within noise")
    return {"difference": difference, "error": error, "verdict": verdict}


def _against_best(point: dict, candidates: list[dict], point_is_method: bool) -> dict:
    """point against the lowest-perplexity candidate (None if there is none), the gap seen from `method`'s side."""
    best = min(candidates, key=lambda r: r["ppl"]) if candidates else None
    if best is None:
        return {"point": point, "reference": None}
    return {"point": point, "reference": best, **(_gap(point, best) if point_is_method else _gap(best, point))}


def compare(merged: list[dict], method: str) -> list[dict]:
    """At equal data: every other point (aggregated) against the best point of `method` trained on as many tokens
    with no more inference FLOPs (None if it has none)."""
    return [_against_best(point, [r for r in merged if r["method"] == method
                                  and r["train_tokens"] == point["train_tokens"]
                                  and _no_costlier(r, point, "inference_flops_per_token")], point_is_method=False)
            for point in merged if point["method"] != method]


def compare_at_training_cost(merged: list[dict], method: str) -> list[dict]:
    """At equal compute: every point of `method` against the best other point, of any budget, that cost no more
    training FLOPs and no more inference FLOPs (None if there is none)."""
    return [_against_best(point, [r for r in merged if r["method"] != method and _no_costlier(r, point, "train_flops")
                                  and _no_costlier(r, point, "inference_flops_per_token")], point_is_method=True)
            for point in merged if point["method"] == method]


def comparison_table(merged: list[dict], method: str) -> list[str]:
    def name(r):
        return r["run"] + (f" tau {r['tau']:g}" if r["tau"] != "" else "")

    def side(r):  # a side of one seed borrows the other's variance: marked *
        return f"{name(r)} | {r['ppl']:.2f} | {r['seeds']}{'*' if r['seeds'] < 2 else ''}"

    def row(c, missing):
        head = f"| {c['point']['train_tokens'] / 1e6:.2f} | {side(c['point'])} |"
        if c["reference"] is None:
            return head + f" none | | | {missing} |"
        return head + f" {side(c['reference'])} | {c['difference']:+.2f} +- {c['error']:.2f} | {c['verdict']} |"

    header = ["| train tokens (M) | point | ppl | seeds | against | ppl | seeds | difference | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines = [f"**At equal data**: every other point against {method}'s best point trained on as many tokens with "
             f"no more inference FLOPs (+{FLOPS_TOLERANCE:.0%}). Difference: the mean perplexity {method} saves "
             f"(positive: {method} lower) +- its standard error over seeds (a side of one seed, marked *, borrows "
             f"the other's seed variance); verdict: {method} better or worse by more than 2 standard errors, else "
             "within noise.", "", *header]
    lines += [row(c, f"{method} has no point this cheap at this budget")
              for c in sorted(compare(merged, method), key=lambda c: (c["point"]["train_tokens"], c["point"]["run"]))]
    lines += ["", f"**At equal compute**: every point of {method} against the best other point, of any budget, that "
              "cost no more training FLOPs and no more inference FLOPs (same columns, the same sign: positive means "
              f"{method} lower). Where another method is better here, {method}'s gain does not pay for its training "
              "compute.", "", *header]
    lines += [row(c, "nothing else is as cheap to train and to run") for c in compare_at_training_cost(merged, method)]
    return lines


def write_results(rows: list[dict], out: Path, lr_search: list[dict] | None = None, compare_to: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", table.getvalue().encode())
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "lr_search.json", json.dumps(lr_search or [], indent=1))
    merged = aggregate(rows)
    lines = ["| method | run | lr | tau | ppl (mean +- std over seeds) | seeds | inference GFLOPs/token | "
             "mean extra steps | training PFLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(merged, key=lambda r: r["inference_flops_per_token"]):
        spread = f" +- {r['ppl_std']:.2f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {r['run']} | {r['lr']:g} | {r['tau']} | {r['ppl']:.2f}{spread} | "
                     f"{r['seeds']} | {r['inference_flops_per_token'] / 1e9:.4f} | {r['mean_extra_steps']:.2f} | "
                     f"{r['train_flops'] / 1e15:.4f} |")
    if lr_search:
        lines += ["", "Learning-rate search (evaluation loss at the first seed, in the order tried; "
                  "the lowest is kept):", "", "| run | seed | lr | loss |", "|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['seed']} | {r['lr']:g} | {r['loss']:.4f} |" for r in lr_search]
    if compare_to:
        lines += ["", *comparison_table(merged, compare_to)]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(merged, out / "pareto.png")


def plot(rows: list[dict], path: Path) -> None:
    """rows: aggregated (`aggregate`), one point per run and tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    largest = max(r["inference_flops_per_token"] for r in rows)
    scale, unit = (1e9, "GFLOPs") if largest >= 1e9 else (1e6, "MFLOPs")
    budgets = sorted({r["train_tokens"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 5), dpi=130)
    for index, method in enumerate(METHODS):
        color = None
        for budget in budgets:  # a frontier per budget: a longer run is not a point on the shorter one's trade-off
            mine = [r for r in rows if r["method"] == method and r["train_tokens"] == budget]
            if not mine:
                continue
            first = budget == budgets[0]
            points = [(r["inference_flops_per_token"] / scale, r["ppl"]) for r in mine]
            line = ax.plot(*zip(*frontier(points)), "-" if first else "--", alpha=0.6, color=color)[0]
            color = line.get_color()
            label = method if len(budgets) == 1 else f"{method}, {budget / 1e6:.2f}M tokens"
            ax.errorbar(*zip(*points), yerr=[r["ppl_std"] for r in mine], fmt=MARKERS[index % len(MARKERS)], ms=7,
                        color=color, mfc=color if first else "none", label=label, zorder=3, capsize=3)
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%g"))  # plain perplexities, not 2.2 x 10^2
    ax.set_xlabel(f"inference FLOPs per token ({unit}, analytic, slots actually run)")
    ax.set_ylabel("validation perplexity (mean over seeds; bars: std)")
    ax.set_title("Perplexity vs inference compute (lines: frontiers" + ("; dashed: longer budget)" if len(budgets) > 1
                                                                        else ")"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")  # off the points
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
