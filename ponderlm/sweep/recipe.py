"""A sweep's recipe: the base config, the runs and their overrides, the evaluation, taus, learning rates and seeds
(the format is in ponderlm/sweep/__init__.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.methods import METHODS


@dataclass
class Recipe:
    base: str
    runs: list[dict]
    set: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    taus: list[float] = field(default_factory=lambda: [1e-4])
    lrs: list[float] = field(default_factory=list)  # empty: every run at its config's train.lr
    seeds: list[int] = field(default_factory=list)  # empty: every run once, at its config's train.seed
    compare_to: str = ""  # a method: results.md then tests where it is better or worse
    primary: list[str] = field(default_factory=list)  # runs compared with it before the sweep ran: their own family
    lr_search: str = "grid"  # grid: train at every lr; local: walk from the middle of the grid toward lower loss
    order: str = "first_seeds_first"  # or run_by_run: every seed of a run before the next run starts

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PonderError(f"cannot read recipe {path}: {exc}") from None
        if problem := _shape_problem(data):
            raise PonderError(f"recipe {path}: {problem}")
        try:
            recipe = cls(**data)
        except TypeError as exc:
            raise PonderError(f"recipe {path}: {exc} (keys: {', '.join(cls.__dataclass_fields__)})") from None
        names = [run.get("name", "") for run in recipe.runs]
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9._-]+", str(n))]
        if bad or len(set(names)) != len(names) or not names:
            raise PonderError(f"recipe {path}: every run needs a unique name of letters, digits, '.', '_', '-'")
        unknown = set(recipe.eval) - {"split", "search_split", "max_tokens", "scoring"}
        if unknown:
            raise PonderError(f"recipe {path}: unknown eval keys {sorted(unknown)} "
                              "(known: split, search_split, max_tokens, scoring)")
        for split in (recipe.split, recipe.search_split):
            if split not in ("val", "test"):
                raise PonderError(f"recipe {path}: eval splits are val or test, not {split!r} (the training split "
                                  "says nothing about held-out text)")
        unknown = {key for run in recipe.runs for key in run} - {"name", "set", "lrs", "seeds", "lr_from"}
        if unknown:
            raise PonderError(f"recipe {path}: unknown run keys {sorted(unknown)} "
                              "(known: name, set, lrs, seeds, lr_from)")
        if recipe.lr_search not in ("grid", "local"):
            raise PonderError(f"recipe {path}: lr_search is {recipe.lr_search!r}; use grid or local")
        if recipe.order not in ("first_seeds_first", "run_by_run"):
            raise PonderError(f"recipe {path}: order is {recipe.order!r}; use first_seeds_first or run_by_run")
        if recipe.compare_to and recipe.compare_to not in METHODS:
            raise PonderError(f"recipe {path}: compare_to {recipe.compare_to!r} is not a method "
                              f"(known: {', '.join(METHODS)})")
        if set(recipe.primary) - set(names) or (recipe.primary and not recipe.compare_to):
            raise PonderError(f"recipe {path}: primary names runs compared with compare_to's method; "
                              f"{sorted(set(recipe.primary) - set(names)) or 'compare_to is not set'}")
        for index, run in enumerate(recipe.runs):
            if "lr_from" in run and run["lr_from"] not in names[:index]:
                raise PonderError(f"recipe {path}: run {run['name']} takes lr_from {run['lr_from']!r}, which is not "
                                  "an earlier run")
        try:  # YAML reads 1e-3 (no dot) as a string
            recipe.lrs, recipe.seeds = [float(x) for x in recipe.lrs], [int(x) for x in recipe.seeds]
            recipe.taus = [float(x) for x in recipe.taus]
            for run in recipe.runs:
                run.update({key: [kind(x) for x in run[key]] for key, kind in (("lrs", float), ("seeds", int))
                            if key in run})
        except (TypeError, ValueError) as exc:
            raise PonderError(f"recipe {path}: lrs and taus must be numbers and seeds integers ({exc})") from None
        _check_evaluation(recipe, path)
        return recipe

    @property
    def split(self) -> str:
        """The split every reported number is measured on."""
        return self.eval.get("split", "val")

    @property
    def search_split(self) -> str:
        """The split the learning-rate search compares on: held out from the reported numbers when it differs."""
        return self.eval.get("search_split", "val")

    def config(self, run: dict, lr: float | None = None, seed: int | None = None):
        extra = ([f"train.lr={lr}"] if lr is not None else []) + ([f"train.seed={seed}"] if seed is not None else [])
        return load_config(self.base, [*run.get("set", []), *extra], shared=self.set)

    def grid(self, run: dict, chosen: dict[str, float | None]) -> tuple[list[float | None], list[int | None]]:
        """The learning rates to choose from and the seeds to run (None: the config's own value)."""
        lrs = [chosen[run["lr_from"]]] if "lr_from" in run else list(run.get("lrs", self.lrs)) or [None]
        return lrs, list(run.get("seeds", self.seeds)) or [None]


def run_dir_name(name: str, lr: float | None, seed: int | None) -> str:
    return name + (f"-lr{lr:g}" if lr is not None else "") + (f"-s{seed}" if seed is not None else "")


def _shape_problem(data) -> str | None:
    """What is wrong with the recipe's structure (YAML types), before any key is read; None if nothing."""
    if not isinstance(data, dict):
        return "a recipe is a YAML mapping (base:, set:, runs:, ...)"
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(run, dict) for run in runs):
        return "runs must be a list of mappings, e.g. runs: [{name: vanilla, set: [method=vanilla]}]"
    for key in ("set", "taus", "lrs", "seeds", "primary"):
        if key in data and not isinstance(data[key], list):
            return f"{key} must be a list, e.g. {key}: [{data[key]}]"
    if "eval" in data and not isinstance(data["eval"], dict):
        return "eval must be a mapping, e.g. eval: {split: test, max_tokens: 65536}"
    for run in runs:
        if not isinstance(run.get("name"), str):
            return f"every run needs a name that is text (got {run.get('name')!r}); quote it if it looks like a number"
        for key in ("set", "lrs", "seeds"):
            if key in run and not isinstance(run[key], list):
                return f"run {run['name']}: {key} must be a list, e.g. {key}: [{run[key]}]"
    return None


def _check_evaluation(recipe: Recipe, path: Path) -> None:
    """What would otherwise fail only at the first evaluation, after hours of training."""
    from ponderlm.schema import check_tau
    from ponderlm.engine import SCORINGS

    for tau in recipe.taus:
        try:
            check_tau(tau)
        except PonderError as exc:
            raise PonderError(f"recipe {path}: taus: {exc}") from None
    max_tokens = recipe.eval.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise PonderError(f"recipe {path}: eval.max_tokens is {max_tokens!r}; give a positive number of tokens")
    if recipe.eval.get("scoring", "exact") not in SCORINGS:
        raise PonderError(f"recipe {path}: eval.scoring is {recipe.eval['scoring']!r}; use {' or '.join(SCORINGS)}")
