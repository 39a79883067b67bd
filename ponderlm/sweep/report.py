"""A sweep's report: results.csv/json (a row per run, seed and tau), results.md (the table over seeds, the
learning-rate search and the tested comparisons) and pareto.png."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ponderlm.files import standard_json, atomic_path, atomic_write_bytes, atomic_write_text
from ponderlm.methods import METHODS
from ponderlm.sweep.stats import holm, paired, welch

COLUMNS = ["method", "run", "seed", "lr", "tau", "ppl", "loss", "inference_flops_per_token", "mean_extra_steps",
           "train_flops", "train_tokens", "soft_ppl", "split", "eval_tokens", "scoring", "precision", "cpu",
           "cpu_capability", "torch", "threads", "train_seconds", "lr_search_split"]
# What each run ran with (ponderlm/machine.py): empty for the published runs of sweeps from before it was recorded.
RECORDED = ("precision", "cpu", "cpu_capability", "torch", "threads", "train_seconds")
MARKERS = "osD^v*PXhp<>"  # one per method, in registry order


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
        merged.append({**members[0], **numbers, "ppl": mean, "ppl_std": std, "seeds": len(members),
                       "ppl_by_seed": {r["seed"]: r["ppl"] for r in members}})
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
    """other's perplexity minus mine, tested over seeds: Welch's t-test (None when a side has one seed) and the paired
    test over the seeds both ran. The verdict is set by `judge`, once the table's p-values are all known."""
    return {"welch": welch(list(mine["ppl_by_seed"].values()), list(other["ppl_by_seed"].values())),
            "paired": paired(mine["ppl_by_seed"], other["ppl_by_seed"]), "difference": other["ppl"] - mine["ppl"]}


def _against_best(point: dict, candidates: list[dict], point_is_method: bool) -> dict:
    """point against the lowest-perplexity candidate (None if there is none), the gap seen from `method`'s side."""
    best = min(candidates, key=lambda r: r["ppl"]) if candidates else None
    if best is None:
        return {"point": point, "reference": None}
    return {"point": point, "reference": best, **(_gap(point, best) if point_is_method else _gap(best, point))}


def judge(comparisons: list[dict], primary: tuple[str, ...] = (), level: float = 0.05) -> list[dict]:
    """Each comparison's verdict from its Welch p-value, Holm-adjusted within its family: the comparisons whose point
    is a `primary` run (named in the recipe before the sweep ran), and the exploratory rest. Better or worse when
    the adjusted p is below `level`, else not significant; a side of one seed is not tested."""
    for family in (True, False):
        tested = [c for c in comparisons if c.get("welch") and (c["point"]["run"] in primary) == family]
        for c, adjusted in zip(tested, holm([c["welch"].p for c in tested])):
            c["p_holm"], c["primary"] = adjusted, family
            c["verdict"] = "not significant" if adjusted >= level else "better" if c["difference"] > 0 else "worse"
    for c in comparisons:
        if c["reference"] is not None and not c.get("welch"):
            c["verdict"] = "1 seed: not tested" if min(c["point"]["seeds"], c["reference"]["seeds"]) < 2 \
                else "no spread: not tested"
    return comparisons


def compare(merged: list[dict], method: str, primary: tuple[str, ...] = ()) -> list[dict]:
    """At equal data: every other point (aggregated) against the best point of `method` trained on as many tokens
    with no more inference FLOPs (None if it has none)."""
    return judge([_against_best(point, [r for r in merged if r["method"] == method
                                        and r["train_tokens"] == point["train_tokens"]
                                        and _no_costlier(r, point, "inference_flops_per_token")],
                                point_is_method=False) for point in merged if point["method"] != method], primary)


def compare_at_training_cost(merged: list[dict], method: str) -> list[dict]:
    """At equal compute: every point of `method` against the best other point, of any budget, that cost no more
    training FLOPs and no more inference FLOPs (None if there is none)."""
    return judge([_against_best(point, [r for r in merged if r["method"] != method
                                        and _no_costlier(r, point, "train_flops")
                                        and _no_costlier(r, point, "inference_flops_per_token")], point_is_method=True)
                  for point in merged if point["method"] == method])


def comparison_table(merged: list[dict], method: str, primary: tuple[str, ...] = ()) -> list[str]:
    def name(r):
        return r["run"] + (f" tau {r['tau']:g}" if r["tau"] is not None else "")

    def side(r):
        spread = f" +- {r['ppl_std']:.2f}" if r["seeds"] > 1 else ""
        return [name(r), f"{r['ppl']:.2f}{spread}", str(r["seeds"])]

    def row(c, missing):
        cells = [f"{c['point']['train_tokens'] / 1e6:.2f}", *side(c["point"])]
        if c.get("primary"):
            cells[1] = f"**{cells[1]}**"
        if c["reference"] is None:
            cells += ["none", *[""] * 8, missing]
        else:
            welch, pairs = c["welch"], c["paired"]
            cells += [*side(c["reference"]), f"{c['difference']:+.2f}",
                      *([f"[{welch.low:+.2f}, {welch.high:+.2f}]", f"{welch.t:.2f} ({welch.df:.1f})",
                         f"{welch.p:.3f}", f"{c['p_holm']:.3f}"] if welch else [""] * 4),
                      f"{pairs.p:.3f} ({pairs.n})" if pairs else "", c["verdict"]]
        return "| " + " | ".join(cells) + " |"

    header = ["| train tokens (M) | point | ppl | seeds | against | ppl | seeds | difference | 95 % interval (Welch) "
              "| t (df) | p | p, Holm | paired p (seeds) | verdict |", "|---" * 14 + "|"]
    tests = (f"Difference: the mean perplexity {method} saves (positive: {method} lower), with its 95 % confidence "
             "interval, t and Welch-Satterthwaite degrees of freedom from Welch's unequal-variance t-test over seeds "
             "(two-sided p). The verdict is Holm's step-down adjustment of the Welch p at 0.05 within a family: "
             + (f"the recipe's primary comparisons (in bold: {', '.join(primary)}, named before the runs), and the "
                "exploratory rest of the table" if primary else "the rows of this table") +
             ". A side of one seed has no variance of its own and is not tested. Paired p: the "
             "paired t-test over the seeds both sides ran (a seed fixes the initialisation and the data order), "
             "reported, not used for the verdict.")
    lines = [f"**At equal data**: every other point against {method}'s best point trained on as many tokens with "
             f"no more inference FLOPs (+{FLOPS_TOLERANCE:.0%}). {tests}", "", *header]
    lines += [row(c, f"{method} has no point this cheap at this budget")
              for c in sorted(compare(merged, method, primary),
                              key=lambda c: (c["point"]["train_tokens"], c["point"]["run"]))]
    lines += ["", f"**At equal compute**: every point of {method} against the best other point, of any budget, that "
              "cost no more training FLOPs and no more inference FLOPs (same columns, the same sign: positive means "
              f"{method} lower; its own Holm family). Where another method is better here, {method}'s gain does not "
              "pay for its training compute.", "", *header]
    lines += [row(c, "nothing else is as cheap to train and to run") for c in compare_at_training_cost(merged, method)]
    return lines


def _tau_text(tau: float | None):
    """A row's tau as results.csv and results.json hold it: "" for a run that does not prune."""
    return "" if tau is None else tau


def read_rows(path: Path) -> list[dict]:
    """A results.json's rows; a diverged run's perplexity, written as null (JSON has no inf), is inf again, and the
    tau of a run that does not prune ("" in the file) is None."""
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("not a list of result rows")
    missing = [key for key in ("method", "run", "seed", "lr", "tau", "ppl", "loss", "inference_flops_per_token",
                               "train_flops", "train_tokens", "split") if any(key not in row for row in rows)]
    if missing:
        raise ValueError(f"a row lacks {missing[0]!r}")
    for row in rows:
        row.update({key: math.inf for key in ("ppl", "loss") if row[key] is None})
        row["tau"] = None if row["tau"] in ("", None) else float(row["tau"])
        numbers = ("ppl", "loss", "inference_flops_per_token", "train_flops", "train_tokens")
        if bad := [key for key in numbers if isinstance(row[key], bool) or not isinstance(row[key], (int, float))]:
            raise ValueError(f"run {row['run']}'s {bad[0]} is {row[bad[0]]!r}, not a number")
    return rows


def read_results(directory: Path) -> tuple[list[dict], list[dict]]:
    """What write_results wrote: the rows of results.json and the learning-rate search of lr_search.json (none if
    absent). Raises OSError or ValueError for files that cannot be read as such."""
    search = Path(directory) / "lr_search.json"
    return read_rows(Path(directory) / "results.json"), (json.loads(search.read_text()) if search.exists() else [])


def write_results(rows: list[dict], out: Path, lr_search: list[dict] | None = None, compare_to: str = "",
                  primary: list[str] | tuple[str, ...] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    stored = [{**row, "tau": _tau_text(row["tau"])} for row in rows]
    writer.writerows(stored)
    atomic_write_bytes(out / "results.csv", table.getvalue().encode())
    atomic_write_text(out / "results.json", standard_json(stored, indent=1))
    atomic_write_text(out / "lr_search.json", standard_json(lr_search or [], indent=1))
    merged = aggregate(rows)
    lines = [*_provenance(rows), "", "| method | run | lr | tau | ppl (mean +- std over seeds) | seeds | "
             "inference GFLOPs/token | mean extra steps | training PFLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(merged, key=lambda r: r["inference_flops_per_token"]):
        spread = f" +- {r['ppl_std']:.2f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {r['run']} | {r['lr']:g} | {_tau_text(r['tau'])} | {r['ppl']:.2f}"
                     f"{spread} | {r['seeds']} | {r['inference_flops_per_token'] / 1e9:.4f} | "
                     f"{r['mean_extra_steps']:.2f} | {r['train_flops'] / 1e15:.4f} |")
    if lr_search:
        lines += ["", "Learning-rate search (evaluation loss at the first seed, in the order tried; "
                  "the lowest is kept):", "", "| run | seed | lr | split | loss |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['seed']} | {r['lr']:g} | {r.get('split', 'val')} | {r['loss']:.4f} |"
                  for r in lr_search]
    if compare_to:
        lines += ["", *comparison_table(merged, compare_to, tuple(primary))]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(merged, out / "pareto.png")


SPLITS = {"val": "validation", "test": "test"}


def _provenance(rows: list[dict]) -> list[str]:
    """What the numbers are measured on and what they ran with, from the rows themselves."""
    def values(key):
        return ", ".join(sorted({str(r.get(key, "")) or "not recorded" for r in rows}))

    searched = {r.get("lr_search_split", "") for r in rows} - {""}
    held_out = ("no learning-rate search" if not searched else
                "learning rates chosen on other tokens (" + ", ".join(sorted(searched)) + " split)"
                if not searched & {r["split"] for r in rows} else
                "**learning rates chosen on these same tokens: optimistic for every run, more for wider grids**")
    return [f"Perplexity on the {values('split')} split ({values('eval_tokens')} tokens, {values('scoring')} "
            f"scoring); {held_out}. Trained in {values('precision')} on {values('cpu')} "
            f"({values('cpu_capability')}), torch {values('torch')}, {values('threads')} threads."]


def plot(rows: list[dict], path: Path) -> None:
    """rows: aggregated (`aggregate`), one point per run and tau; a diverged run (perplexity inf) is left out."""
    rows = [r for r in rows if math.isfinite(r["ppl"])]
    if not rows:
        return
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
    split = " / ".join(sorted({SPLITS.get(r["split"], r["split"]) for r in rows}))
    ax.set_ylabel(f"{split} perplexity (mean over seeds; bars: std)")
    ax.set_title("Perplexity vs inference compute (lines: frontiers" + ("; dashed: longer budget)" if len(budgets) > 1
                                                                        else ")"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")  # off the points
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
