"""Running a sweep: train every run of a recipe (or resume it, or take it from a published sweep), search the
learning rate, evaluate, and rewrite the report after every run."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ponderlm.data import read_metadata
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_run
from ponderlm.files import standard_json, atomic_write_bytes, atomic_write_text
from ponderlm.methods import model_skeleton
from ponderlm.rundir import RunDir
from ponderlm.sweep.recipe import Recipe, run_dir_name
from ponderlm.sweep.report import RECORDED, read_results, write_results
from ponderlm.train import config_changes, train


def _evaluate(run: RunDir, split: str, max_tokens: int | None, tau: float | None, with_soft: bool,
              scoring: str) -> dict:
    """Evaluate once and store the result in the run directory, keyed by what was asked."""
    store = run.report_file("sweep_eval.json")
    try:
        stored = json.loads(store.read_text()) if store.exists() else {}
        if not isinstance(stored, dict):
            raise ValueError("not a mapping")
    except ValueError as exc:  # a cache: evaluating again is the repair
        _log(f"{store} is damaged ({exc}); evaluating {run.path.name} again")
        stored = {}
    checkpoint = run.require_checkpoint().name
    key = f"{checkpoint}|{split}|{max_tokens}|{tau}|{with_soft}" + ("" if scoring == "jacobi" else f"|{scoring}")
    if key not in stored:
        stored[key] = evaluate_run(run.path, split=split, max_tokens=max_tokens, tau=tau, with_soft=with_soft,
                                   scoring=scoring)
        atomic_write_text(store, standard_json(stored, indent=1))
    return stored[key]


class Published:
    """A published sweep directory (results.json, lr_search.json): a run found there and with no directory under the
    sweep's own `runs` is taken, not trained again."""

    def __init__(self, directory: Path, runs: Path):
        self.directory, self.runs = Path(directory), runs
        try:
            self.rows, self.search = read_results(self.directory)
        except (OSError, ValueError) as exc:
            raise PonderError(f"--reuse {directory}: cannot read its results ({exc})") from None
        if not self.rows:
            raise PonderError(f"--reuse {directory}: its results.json holds no runs; drop --reuse")

    def _matching(self, records: list[dict], name: str, lr: float | None, seed: int | None) -> list[dict]:
        if (self.runs / run_dir_name(name, lr, seed)).exists():
            return []
        return [r for r in records if r["run"] == name and (lr is None or r["lr"] == lr)
                and (seed is None or r["seed"] == seed)]

    def rows_of(self, name: str, lr: float | None, seed: int | None) -> list[dict]:
        return self._matching(self.rows, name, lr, seed)

    def loss_of(self, name: str, lr: float, seed: int | None, split: str) -> float | None:
        found = [r for r in self._matching(self.search, name, lr, seed) if r.get("split", "val") == split]
        return found[0]["loss"] if found else None


def run_sweep(recipe_path: Path, out: Path, progress: bool | None = None, reuse: Path | None = None) -> list[dict]:
    recipe = Recipe.load(recipe_path)
    for run in recipe.runs:  # validate every config, and the splits it is evaluated on, before training anything
        lrs, seeds = recipe.grid(run, chosen={name: None for name in (r["name"] for r in recipe.runs)})
        for lr in lrs:
            for seed in seeds:
                config = recipe.config(run, lr, seed)
        _check_splits(recipe, run["name"], config)
    published = Published(reuse, out / "runs") if reuse else None
    search, chosen, searched_on, done, waiting = [], {}, {}, {}, []

    def train_and_evaluate(run, lr, seed, split=recipe.split, first_tau_only=False):
        return _train_and_evaluate(recipe, run, lr, seed, out, progress, published, split, first_tau_only)

    def rows():  # in recipe order, whatever order they ran in
        return [row for key in sorted(done) for row in done[key]]

    def add(key, run, lr, seed):
        done[key] = [{**row, "lr_search_split": searched_on[run["name"]]} for row in train_and_evaluate(run, lr, seed)]
        # after every run, so that a long sweep can publish its part
        write_results(rows(), out, search, recipe.compare_to, recipe.primary)

    for index, run in enumerate(recipe.runs):
        lrs, seeds = recipe.grid(run, chosen)
        lr, split = lrs[0], recipe.search_split
        searched_on[run["name"]] = searched_on[run["lr_from"]] if "lr_from" in run else split if len(lrs) > 1 else ""
        if len(lrs) > 1:
            def loss_at(lr):
                loss = published.loss_of(run["name"], lr, seeds[0], split) if published else None
                if loss is None:
                    loss = train_and_evaluate(run, lr, seeds[0], split, first_tau_only=True)[0]["loss"]
                loss = loss if math.isfinite(loss) else math.inf  # a diverged lr loses; NaN would not compare
                search.append({"run": run["name"], "seed": seeds[0], "lr": lr, "loss": loss, "split": split})
                # each point as it comes: a machine lost mid-search keeps the points published (--reuse reads them)
                write_results(rows(), out, search, recipe.compare_to, recipe.primary)
                return loss
            lr = search_lr(lrs, loss_at, local=recipe.lr_search == "local")
            if lr in (min(lrs), max(lrs)):
                _log(f"{run['name']} chose lr {lr:g}, the edge of its grid {sorted(lrs)}: the optimum may lie "
                     "outside it; extend lrs")
        chosen[run["name"]] = lr
        for position, seed in enumerate(seeds):
            # A seed that still has to train waits until every run has its first seed in: the table has every run
            # early (unless the recipe asks to finish each run first, when its comparisons come in order of priority).
            if position == 0 or recipe.order == "run_by_run" or _trained(recipe, run, lr, seed, out, published):
                add((index, position), run, lr, seed)
            else:
                waiting.append(((index, position), run, lr, seed))
    for key, run, lr, seed in waiting:
        add(key, run, lr, seed)
    return rows()


def _check_splits(recipe: Recipe, name: str, config) -> None:
    meta = read_metadata(Path(config.data.path))
    for split in {recipe.split, recipe.search_split}:
        tokens = meta["splits"].get(split, {}).get("tokens", 0)
        if tokens < config.data.seq_len + 1:
            raise PonderError(f"run {name}: the {split} split of {config.data.path} has {tokens} tokens, fewer than "
                              f"one window of data.seq_len + 1 = {config.data.seq_len + 1}; evaluate on another "
                              "split or prepare more text")


def rewrite_report(recipe_path: Path, out: Path) -> list[dict]:
    """Rewrite results.md/csv and pareto.png from the rows and search a sweep directory holds, with the recipe's
    comparison: a report of this version's for a sweep that is still running or was published by an older one."""
    recipe = Recipe.load(recipe_path)
    try:
        rows, search = read_results(out)
    except (OSError, ValueError) as exc:
        raise PonderError(f"--report-only: cannot read the results in {out} ({exc})") from None
    if not rows:
        raise PonderError(f"--report-only: {out}/results.json holds no runs yet")
    write_results(rows, out, search, recipe.compare_to, recipe.primary)
    return rows


def _trained(recipe: Recipe, run: dict, lr: float | None, seed: int | None, out: Path,
             published: Published | None) -> bool:
    """Whether a run needs no more training: finished under `out`, or published."""
    if published is not None and published.rows_of(run["name"], lr, seed):
        return True
    rundir = RunDir(out / "runs" / run_dir_name(run["name"], lr, seed))
    return rundir.finished(recipe.config(run, lr, seed).train.steps)


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
                        progress: bool | None, published: Published | None, split: str,
                        first_tau_only: bool = False) -> list[dict]:
    """Train one run (or resume it, or find it finished, or take it from `published`) and evaluate it on `split`: a
    row per tau, the run's tau first. Its training log is copied to the sweep's logs/, to publish with the tables.

    The learning-rate search compares the first tau only, so a learning rate that loses is not evaluated at the
    others."""
    config = recipe.config(run, lr, seed)
    rundir = RunDir(out / "runs" / run_dir_name(run["name"], lr, seed))
    if published is not None and (found := published.rows_of(run["name"], lr, seed)):
        return _reused(recipe, config, found, published.directory, rundir.path.name, split, first_tau_only)
    resume = rundir.holds_run()
    if resume and (changed := config_changes(rundir.read_config(), config)):
        raise PonderError(f"{rundir} was trained with another config than the recipe now gives it ({changed}); "
                          "sweep into a new --out, or delete that run directory to retrain it")
    started = time.monotonic()
    checkpoint = rundir.latest_checkpoint()
    trained_now = not rundir.finished(config.train.steps)
    if trained_now:
        _log(f"{rundir.path.name}: training" + (f", resuming from {checkpoint.name}" if checkpoint else ""))
        train(None if resume else config, rundir.path, resume=resume, progress=progress)
    config = rundir.read_config()  # as trained: training sets model.vocab_size from the tokenizer
    model = model_skeleton(config)
    train_tokens = _train_tokens(config)
    train_flops = model.training_flops_per_token() * train_tokens
    max_tokens = recipe.eval.get("max_tokens")
    (out / "logs").mkdir(exist_ok=True)
    atomic_write_bytes(out / "logs" / f"{rundir.path.name}.jsonl", rundir.metrics_file.read_bytes())
    rows, soft_ppl = [], ""
    ran = rundir.session_summary()
    taus = (recipe.taus[:1] if first_tau_only else recipe.taus) if model.prunable else [None]
    for index, tau in enumerate(taus):
        # The soft loss does not depend on tau: compute it with the first tau only.
        result = _evaluate(rundir, split, max_tokens, tau, with_soft=index == 0,
                           scoring=recipe.eval.get("scoring", "exact"))
        soft_ppl = result.get("soft_ppl", soft_ppl)
        rows.append({"method": config.method, "run": run["name"], "seed": config.train.seed, "lr": config.train.lr,
                     "tau": tau, "ppl": result["ppl"], "loss": result["loss"],
                     "inference_flops_per_token": result["inference_flops_per_token"],
                     "mean_extra_steps": result["mean_extra_steps"], "train_flops": train_flops,
                     "train_tokens": train_tokens, "soft_ppl": soft_ppl, "split": split,
                     "eval_tokens": result["tokens"], "scoring": result.get("scoring", "jacobi"),
                     **{key: ran.get(key, "") for key in RECORDED}})
    _log(f"{rundir.path.name}: ppl {rows[0]['ppl']:.2f}" + (f" at tau {taus[0]:g}" if taus[0] is not None else "")
         + f" ({(time.monotonic() - started) / 60:.1f} min{'' if trained_now else ', trained earlier'})")
    return rows


def _train_tokens(config) -> int:
    return config.train.steps * (config.train.batch_tokens // config.data.seq_len) * config.data.seq_len


def _reused(recipe: Recipe, config, found: list[dict], directory: Path, name: str, split: str,
            first_tau_only: bool) -> list[dict]:
    """A published run's rows, in the recipe's tau order, once they are shown to be what the recipe asks for."""
    by_tau = {r["tau"]: r for r in found}
    taus = [None] if set(by_tau) == {None} else recipe.taus[:1] if first_tau_only else recipe.taus
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


