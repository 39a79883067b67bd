"""`ponderlm sweep`: every run trained once, evaluated the same way, tau swept, files written, resumable."""

import csv
import json
import math
import shutil
import statistics

import pytest

import ponderlm.sweep.report as report
import ponderlm.sweep.runner as sweep_module
from ponderlm.cli import main
from ponderlm.errors import PonderError
from ponderlm.sweep import run_sweep
from ponderlm.sweep.report import frontier


def write_recipe(path, data_dir, runs):
    path.write_text(json.dumps({
        "base": "tiny",
        "set": [f"data.path={data_dir}", "train.steps=4", "ponder.extra_steps=2", "train.save_every=2"],
        "eval": {"split": "val", "max_tokens": 256},
        "taus": [0.0, 0.3],
        "runs": runs,
    }))
    return path


def record_training(monkeypatch) -> list[tuple[str, bool]]:
    """The (run directory name, resume) of every training the sweep starts, in order; training still runs."""
    trained, real_train = [], sweep_module.train
    monkeypatch.setattr(sweep_module, "train", lambda config, run_dir, **kw: trained.append(
        (run_dir.name, kw["resume"])) or real_train(config, run_dir, **kw))
    return trained


RUNS = [{"name": "vanilla", "set": ["method=vanilla"]}, {"name": "p3", "set": ["method=ponderlm3"]}]


def test_sweep_writes_one_row_per_run_and_tau(tiny_data_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    assert main(["sweep", str(recipe), "--out", str(tmp_path / "sweep")]) == 0
    out = tmp_path / "sweep"
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["tau"]) for r in rows] == [("vanilla", ""), ("p3", "0.0"), ("p3", "0.3")]
    assert {"method", "run", "ppl", "inference_flops_per_token", "mean_extra_steps", "train_flops", "tau"} <= \
        rows[0].keys()
    by_tau = {r["tau"]: r for r in rows if r["run"] == "p3"}
    assert float(by_tau["0.0"]["mean_extra_steps"]) == 2.0  # tau 0 keeps every slot
    assert float(by_tau["0.3"]["inference_flops_per_token"]) <= float(by_tau["0.0"]["inference_flops_per_token"])
    assert float(rows[0]["train_flops"]) < float(by_tau["0.0"]["train_flops"])
    assert by_tau["0.0"]["soft_ppl"] == by_tau["0.3"]["soft_ppl"] != "" and rows[0]["soft_ppl"] == ""
    for row in rows:  # what each run ran with, from its sessions.jsonl
        assert (row["scoring"], row["precision"]) == ("exact", "fp32") and row["cpu"] and float(row["train_seconds"]) > 0
    assert len(json.loads((out / "results.json").read_text())) == 3
    report = (out / "results.md").read_text()
    assert report.count("\n") == 7 and report.startswith(
        "Perplexity on the val split (256 tokens, exact scoring); no learning-rate search. Trained in fp32 on ")
    assert sorted(path.name for path in (out / "logs").iterdir()) == ["p3.jsonl", "vanilla.jsonl"]
    assert (out / "logs" / "p3.jsonl").read_bytes() == (out / "runs" / "p3" / "metrics.jsonl").read_bytes()
    assert (out / "pareto.png").stat().st_size > 10_000
    log = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("sweep ")]
    assert [line.split(" (")[0] for line in log] == [
        "vanilla: training", f"vanilla: ppl {float(rows[0]['ppl']):.2f}",
        "p3: training", f"p3: ppl {float(by_tau['0.0']['ppl']):.2f} at tau 0"]


def test_a_killed_sweep_resumes_without_retraining_finished_runs(tiny_data_dir, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    out = tmp_path / "sweep"
    run_sweep(recipe, out, progress=False)
    # As if killed while training the second run, after its step-2 checkpoint and before any results.
    (out / "results.csv").unlink()
    (out / "runs" / "p3" / "sweep_eval.json").unlink()
    shutil.rmtree(out / "runs" / "p3" / "checkpoints" / "step_0000004")
    trained = record_training(monkeypatch)
    run_sweep(recipe, out, progress=False)
    assert trained == [("p3", True)]
    log = capsys.readouterr().err
    assert "p3: training, resuming from step_0000002" in log
    assert "vanilla: ppl" in log and "min, trained earlier)" in log.split("vanilla: ppl")[-1].splitlines()[0]
    assert (out / "results.csv").exists()


def test_frontier_keeps_only_undominated_points():
    points = [(1.0, 50.0), (2.0, 60.0), (3.0, 40.0), (4.0, 45.0), (5.0, 30.0)]
    assert frontier(points) == [(1.0, 50.0), (3.0, 40.0), (5.0, 30.0)]


def test_bad_recipes_are_explained(tmp_path, tiny_data_dir):
    with pytest.raises(PonderError, match="unique name"):
        run_sweep(write_recipe(tmp_path / "r.yaml", tiny_data_dir, [{"name": "a"}, {"name": "a"}]), tmp_path / "o")
    with pytest.raises(PonderError, match="unknown config key"):
        run_sweep(write_recipe(tmp_path / "r.yaml", tiny_data_dir, [{"name": "a", "set": ["train.stpes=1"]}]),
                  tmp_path / "o")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data_dir, RUNS)
    recipe.write_text(recipe.read_text().replace('"split": "val"', '"split": "train"'))
    with pytest.raises(PonderError, match="eval splits are val or test, not 'train'"):
        run_sweep(recipe, tmp_path / "o")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data_dir, RUNS)
    recipe.write_text(recipe.read_text()[:-1] + ', "lr_search": "random"}')
    with pytest.raises(PonderError, match="lr_search is 'random'; use grid or local"):
        run_sweep(recipe, tmp_path / "o")


@pytest.mark.parametrize("size", [2, 3, 5, 6])
def test_the_local_learning_rate_search_finds_the_grids_best_of_a_unimodal_loss_in_fewer_runs(size):
    grid = [1e-3 * 2 ** i for i in range(size)]
    for best in range(size):
        for slope_left, slope_right in ((1.0, 1.0), (0.1, 3.0), (3.0, 0.1)):
            def loss(lr):
                calls.append(lr)
                position = grid.index(lr)
                return (best - position) * slope_left if position < best else (position - best) * slope_right
            calls = []
            assert sweep_module.search_lr(list(reversed(grid)), loss, local=True) == grid[best]
            assert len(calls) == len(set(calls)), "every rate is trained once"
            # the middle and its neighbours, then one new neighbour per step toward the best
            middle = (size - 1) // 2
            assert calls[0] == grid[middle]
            assert len(calls) == min(size - 1, max(middle, best) + 1) - max(0, min(middle, best) - 1) + 1
            calls = []
            assert sweep_module.search_lr(grid, loss, local=False) == grid[best] and len(calls) == size


def test_shipped_recipes_are_valid():
    from pathlib import Path

    from ponderlm.sweep import Recipe

    for path in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")):
        recipe = Recipe.load(path)
        methods = {recipe.config(run).method for run in recipe.runs}
        # A comparison covers every baseline; an ablation varies one method's knobs (with vanilla as its control).
        assert methods >= {"vanilla", "pause", "loop", "ponderlm1", "ponderlm2", "ponderlm3"} or \
            len(methods - {"vanilla"}) == 1, path
        steps = {recipe.config(run).train.steps for run in recipe.runs}
        assert steps <= {min(steps), 4 * min(steps)}, f"{path}: one budget, or a short one and 4x it"


def test_the_learning_rate_is_chosen_on_evaluation_loss_and_seeds_are_aggregated(tiny_data_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "base": "tiny", "set": [f"data.path={tiny_data_dir}", "train.steps=4", "train.save_every=4"],
        "eval": {"split": "test", "search_split": "val", "max_tokens": 256}, "lrs": [1e-5, 3e-3], "seeds": [0, 1],
        "runs": [{"name": "vanilla", "set": ["method=vanilla"]},
                 {"name": "longer", "set": ["method=vanilla", "train.steps=6"], "lr_from": "vanilla", "seeds": [0]}]}))
    out = tmp_path / "sweep"
    trained = record_training(monkeypatch)
    rows = run_sweep(recipe, out, progress=False)
    # 4 steps at lr 1e-5 learn nothing: 3e-3 is chosen, and the longer run reuses it without searching again.
    # Every run's first seed trains before any run's second; the table keeps the recipe's order.
    assert [name for name, _ in trained] == ["vanilla-lr1e-05-s0", "vanilla-lr0.003-s0", "longer-lr0.003-s0",
                                             "vanilla-lr0.003-s1"]
    assert [(r["run"], r["seed"], r["lr"]) for r in rows] == [("vanilla", 0, 3e-3), ("vanilla", 1, 3e-3),
                                                              ("longer", 0, 3e-3)]
    with open(out / "results.csv") as handle:
        assert [(r["run"], r["seed"]) for r in csv.DictReader(handle)] == [("vanilla", "0"), ("vanilla", "1"),
                                                                           ("longer", "0")]
    vanilla = [r for r in rows if r["run"] == "vanilla"]
    merged, _ = report.aggregate(rows)
    assert merged["ppl"] == pytest.approx(statistics.mean(r["ppl"] for r in vanilla))
    assert merged["ppl_std"] == pytest.approx(statistics.stdev(r["ppl"] for r in vanilla)) and merged["ppl_std"] > 0
    table = (out / "results.md").read_text()
    assert f"{merged['ppl']:.2f} +- {merged['ppl_std']:.2f}" in table and "| vanilla | 0 | 1e-05 |" in table
    assert "vanilla chose lr 0.003, the edge of its grid [1e-05, 0.003]" in capsys.readouterr().err
    # Held out: the search compared validation losses, every reported number is on the test split.
    search = json.loads((out / "lr_search.json").read_text())
    assert [(r["lr"], r["split"]) for r in search] == [(1e-5, "val"), (3e-3, "val")]
    assert {(r["split"], r["lr_search_split"]) for r in rows} == {("test", "val")}
    stored = json.loads((out / "runs" / "vanilla-lr0.003-s0" / "sweep_eval.json").read_text())
    assert sorted(key.split("|")[1] for key in stored) == ["test", "val"]
    assert stored[next(k for k in stored if "|val|" in k)]["loss"] == search[1]["loss"] != rows[0]["loss"]
    assert "learning rates chosen on other tokens (val split)" in table and "| vanilla | 0 | 0.003 | val |" in table
    # --report-only rewrites the report from results.json alone, training nothing
    (out / "results.md").unlink()
    assert main(["sweep", str(recipe), "--out", str(out), "--report-only"]) == 0
    assert (out / "results.md").read_text() == table and len(trained) == 4


def test_a_sweep_reuses_published_runs_instead_of_training_them_again(tiny_data_dir, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    protocol = {"base": "tiny", "set": [f"data.path={tiny_data_dir}", "train.steps=4", "train.save_every=4",
                                        "ponder.extra_steps=2"],
                "eval": {"split": "val", "max_tokens": 256}, "taus": [0.0, 0.3], "lrs": [1e-5, 3e-3], "seeds": [0, 1]}
    recipe.write_text(json.dumps({**protocol, "runs": [{"name": "p3", "set": ["method=ponderlm3"]}]}))
    first = run_sweep(recipe, tmp_path / "lost", progress=False)
    published = tmp_path / "published"  # what a sweep publishes; its run directories are gone
    published.mkdir()
    for name in ("results.json", "lr_search.json", "results.md"):
        shutil.copy(tmp_path / "lost" / name, published / name)
    shutil.rmtree(tmp_path / "lost")
    # The recipe grows a run; only that run trains, and it reads lr_from the published search.
    runs = [{"name": "p3", "set": ["method=ponderlm3"]},
            {"name": "vanilla", "set": ["method=vanilla"], "lr_from": "p3", "seeds": [0]}]
    recipe.write_text(json.dumps({**protocol, "runs": runs}))
    trained = record_training(monkeypatch)
    capsys.readouterr()
    out = tmp_path / "continued"
    rows = run_sweep(recipe, out, progress=False, reuse=published)
    assert [name for name, _ in trained] == ["vanilla-lr0.003-s0"]
    assert rows[:4] == first and rows[4]["run"] == "vanilla"
    search = json.loads((published / "lr_search.json").read_text())
    assert json.loads((out / "lr_search.json").read_text()) == search and len(search) == 2
    # A published seed needs no training, so it does not wait behind the new run's first seed.
    log = capsys.readouterr().err
    assert log.index(f"p3-lr0.003-s1: ppl {first[2]['ppl']:.2f} (published in {published})") < \
        log.index("vanilla-lr0.003-s0: training")
    # A published run that is not what the recipe now asks for is refused, not silently taken.
    recipe.write_text(json.dumps({**protocol, "runs": runs}).replace("train.steps=4", "train.steps=6"))
    assert main(["sweep", str(recipe), "--out", str(tmp_path / "again"), "--reuse", str(tmp_path / "nowhere")]) == 2
    assert "ponderlm: error: --reuse " in capsys.readouterr().err and not (tmp_path / "again").exists()
    with pytest.raises(PonderError, match=r"p3-lr0.003-s0 in .*results.json is not what the recipe asks for "
                                          r"\(train_tokens: \d+ -> \d+\); drop --reuse"):
        run_sweep(recipe, tmp_path / "again", progress=False, reuse=published)


def test_a_learning_rate_search_publishes_each_point_as_it_comes(tiny_data_dir, tmp_path, monkeypatch):
    """A machine lost in the middle of a search loses only the point in progress: lr_search.json holds the others."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, [{"name": "vanilla", "set": ["method=vanilla"]}])
    recipe.write_text(recipe.read_text()[:-1] + ', "lrs": [1e-5, 3e-3]}')
    trained, real_train = [], sweep_module.train

    def train_then_lose_the_machine(config, run_dir, **kw):
        if trained:
            raise KeyboardInterrupt
        trained.append(run_dir.name)
        return real_train(config, run_dir, **kw)
    monkeypatch.setattr(sweep_module, "train", train_then_lose_the_machine)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe, tmp_path / "sweep", progress=False)
    search = json.loads((tmp_path / "sweep" / "lr_search.json").read_text())
    assert [(r["run"], r["lr"]) for r in search] == [("vanilla", 1e-5)] and math.isfinite(search[0]["loss"])


def test_run_by_run_finishes_every_seed_of_a_run_before_the_next(tiny_data_dir, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    recipe.write_text(recipe.read_text()[:-1] + ', "seeds": [0, 1], "order": "run_by_run"}')
    trained = record_training(monkeypatch)
    rows = run_sweep(recipe, tmp_path / "sweep", progress=False)
    assert [name for name, _ in trained] == ["vanilla-s0", "vanilla-s1", "p3-s0", "p3-s1"]
    assert [(r["run"], r["seed"]) for r in rows if r["tau"] in (None, 0.0)] == [
        ("vanilla", 0), ("vanilla", 1), ("p3", 0), ("p3", 1)]


def test_lr_from_must_name_an_earlier_run(tmp_path, tiny_data_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, [{"name": "a", "set": [], "lr_from": "b"},
                                                                    {"name": "b", "set": []}])
    with pytest.raises(PonderError, match="lr_from 'b', which is not an earlier run"):
        run_sweep(recipe, tmp_path / "sweep")


def point(method, ppls, flops, tokens=1000, tau=None, train_flops=1.0, run=None, seeds=None):
    """An aggregated point, as `report.aggregate` makes it from one row per seed."""
    seeds = seeds or list(range(len(ppls)))
    rows = [{"method": method, "run": run or method, "tau": tau, "seed": seed, "ppl": ppl,
             "inference_flops_per_token": flops, "train_tokens": tokens, "train_flops": train_flops, "split": "val",
             "mean_extra_steps": 0.0}
            for seed, ppl in zip(seeds, ppls)]
    [merged] = report.aggregate(rows)
    return merged


def test_the_comparison_takes_the_best_reference_point_no_more_costly_and_tests_it_over_seeds():
    merged = [point("ponderlm3", [97.0, 100.0, 103.0], 10.0, tau=0.5), point("ponderlm3", [86.0, 90.0, 94.0], 30.0),
              point("vanilla", [131.0, 135.0, 139.0], 9.95), point("ponderlm2", [93.0], 30.0),
              point("pause", [100.0, 102.0, 104.0], 5.0), point("loop", [79.0, 80.0, 81.0], 30.0, tokens=4000),
              point("halting", [99.0, 104.0, 103.0], 10.0, seeds=[0, 1, 7])]
    found = {c["point"]["method"]: c for c in report.compare(merged, "ponderlm3")}
    # vanilla: only the tau-0.5 point is as cheap (within 1 %)
    assert found["vanilla"]["reference"]["tau"] == 0.5
    assert found["vanilla"]["difference"] == pytest.approx(35.0)
    welch, pairs = found["vanilla"]["welch"], found["vanilla"]["paired"]
    assert (welch.t, welch.df) == pytest.approx((35 / math.sqrt(9 / 3 + 16 / 3), (25 / 3) ** 2 / (
        (9 / 3) ** 2 / 2 + (16 / 3) ** 2 / 2)))
    assert pairs.n == 3 and found["halting"]["paired"].n == 2  # seeds 0 and 1 only
    # two tested comparisons (vanilla, halting) form the Holm family: the smaller p doubled
    assert found["vanilla"]["p_holm"] == pytest.approx(min(1, 2 * min(welch.p, found["halting"]["welch"].p)))
    assert found["vanilla"]["verdict"] == "better" and found["halting"]["verdict"] == "not significant"
    assert found["ponderlm2"]["welch"] is None and found["ponderlm2"]["verdict"] == "1 seed: not tested"
    assert found["pause"]["reference"] is None  # nothing of ponderlm3's is as cheap
    assert found["loop"]["reference"] is None  # another budget
    table = "\n".join(report.comparison_table(merged, "ponderlm3"))
    assert (f"| 0.00 | vanilla | 135.00 +- 4.00 | 3 | ponderlm3 tau 0.5 | 100.00 +- 3.00 | 3 | +35.00 | "
            f"[{welch.low:+.2f}, {welch.high:+.2f}] | {welch.t:.2f} ({welch.df:.1f}) | {welch.p:.3f} | "
            f"{found['vanilla']['p_holm']:.3f} | {pairs.p:.3f} (3) | better |") in table
    assert "| ponderlm2 | 93.00 | 1 | ponderlm3 | 90.00 +- 4.00 | 3 | +3.00 |  |  |  |  |  | 1 seed: not tested |" \
        in table  # positive: ponderlm3 lower
    # vanilla named primary before the runs: a family of its own, so its p is not adjusted for halting's
    found = {c["point"]["method"]: c for c in report.compare(merged, "ponderlm3", primary=("vanilla",))}
    assert found["vanilla"]["p_holm"] == pytest.approx(welch.p) and found["vanilla"]["primary"]
    assert found["halting"]["p_holm"] == pytest.approx(found["halting"]["welch"].p)
    assert "| 0.00 | **vanilla** | 135.00 +- 4.00 |" in "\n".join(report.comparison_table(merged, "ponderlm3",
                                                                                            ("vanilla",)))


def test_at_equal_compute_the_rival_costs_no_more_to_train_and_to_run():
    merged = [point("ponderlm3", [98.0, 100.0, 102.0], 10.0, train_flops=7.0),
              point("vanilla", [84.0, 90.0, 96.0], 10.05, tokens=4000, train_flops=4.0, run="vanilla-4x"),
              point("vanilla", [74.0, 80.0, 86.0], 10.0, tokens=8000, train_flops=8.0, run="vanilla-8x"),
              point("vanilla", [114.0, 120.0, 126.0], 10.0, train_flops=1.0),
              point("pause", [70.0], 30.0, train_flops=3.0)]
    [found] = report.compare_at_training_cost(merged, "ponderlm3")
    # vanilla-8x costs more to train, pause more to run: the best rival is vanilla-4x
    assert found["reference"]["run"] == "vanilla-4x"
    assert found["difference"] == pytest.approx(-10.0) and found["welch"].p < 0.1
    assert found["verdict"] == ("worse" if found["welch"].p < 0.05 else "not significant")


def test_the_learning_rate_search_evaluates_losing_rates_at_the_first_tau_only(tiny_data_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "base": "tiny", "set": [f"data.path={tiny_data_dir}", "train.steps=4", "train.save_every=4",
                                "ponder.extra_steps=2"],
        "eval": {"split": "val", "max_tokens": 256}, "taus": [0.0, 0.3], "lrs": [1e-5, 3e-3],
        "compare_to": "ponderlm3", "runs": [{"name": "p3", "set": ["method=ponderlm3"]}]}))
    out = tmp_path / "sweep"
    rows = run_sweep(recipe, out, progress=False)
    assert [(r["lr"], r["tau"]) for r in rows] == [(3e-3, 0.0), (3e-3, 0.3)]
    stored = {lr: json.loads((out / "runs" / f"p3-lr{lr}" / "sweep_eval.json").read_text())
              for lr in ("1e-05", "0.003")}
    assert [key.split("|")[3] for key in stored["1e-05"]] == ["0.0"]
    assert sorted(key.split("|")[3] for key in stored["0.003"]) == ["0.0", "0.3"]


def test_compare_to_must_be_a_method(tmp_path, tiny_data_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    recipe.write_text(recipe.read_text()[:-1] + ', "compare_to": "ponderlm9"}')
    with pytest.raises(PonderError, match="compare_to 'ponderlm9' is not a method"):
        run_sweep(recipe, tmp_path / "sweep")


def test_a_run_trained_with_another_config_than_the_recipe_gives_is_refused(tiny_data_dir, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, [{"name": "vanilla", "set": ["method=vanilla"]}])
    out = tmp_path / "sweep"
    run_sweep(recipe, out, progress=False)
    recipe.write_text(recipe.read_text().replace("train.steps=4", "train.steps=4\", \"train.warmup_steps=3"))
    with pytest.raises(PonderError, match=r"trained with another config .*train.warmup_steps: \d+ -> 3.* new --out"):
        run_sweep(recipe, out, progress=False)


def test_the_plot_draws_a_frontier_per_method_and_budget(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [point("vanilla", [212.0, 220.0, 228.0], 4.4e6, tokens=491520),
            point("vanilla", [145.0, 150.0, 155.0], 4.4e6, tokens=1966080),
            point("ponderlm3", [199.0, 200.0, 201.0], 4.5e6, tau=0.99, tokens=491520),
            point("ponderlm3", [198.0, 199.0, 200.0], 9.8e6, tau=1e-4, tokens=491520)]
    report.plot(rows, tmp_path / "pareto.png")
    axes = figures[0].axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "vanilla, 0.49M tokens", "vanilla, 1.97M tokens", "ponderlm3, 0.49M tokens"]
    frontiers = [line for line in axes.get_lines() if line.get_linestyle() != "None"]  # not the error bars' markers
    assert [(line.get_linestyle(), len(line.get_xdata())) for line in frontiers] == [("-", 1), ("--", 1), ("-", 2)]
    assert axes.yaxis.get_major_formatter()(200.0) == "200"


@pytest.mark.parametrize("change,message", [
    ({"runs": ["vanilla", "p3"]}, "runs must be a list of mappings"),
    ({"runs": [{"name": 123, "set": []}]}, r"a name that is text \(got 123\)"),
    ({"eval": 5}, "eval must be a mapping"),
    ({"taus": 0.1}, "taus must be a list"),
    ({"taus": ["1e-4", 1.5]}, r"taus: --tau must lie in \[0, 1\), got 1.5"),
    ({"eval": {"split": "val", "max_tokens": 0}}, "eval.max_tokens is 0"),
    ({"eval": {"split": "val", "scoring": "fast"}}, "eval.scoring is 'fast'"),
    ({"set": "train.steps=4"}, "set must be a list"),
    ({"runs": [{"name": "v", "set": "method=vanilla"}]}, "run v: set must be a list"),
    ({"colour": "red"}, "unexpected keyword argument 'colour'"),
    ({"set": ["train.steps=4", "data.seq_len=8192"]}, r"the val split .* has \d+ tokens, fewer than one window"),
])
def test_a_recipe_is_checked_whole_before_anything_trains(tiny_data_dir, tmp_path, monkeypatch, change, message):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    data = json.loads(recipe.read_text())
    data.update(change)
    if "set" in change and isinstance(change["set"], list):
        data["set"] = [f"data.path={tiny_data_dir}", *change["set"]]
    recipe.write_text(json.dumps(data))
    trained = record_training(monkeypatch)
    with pytest.raises(PonderError, match=message):
        run_sweep(recipe, tmp_path / "sweep", progress=False)
    assert trained == []


def test_yaml_strings_for_taus_are_numbers(tiny_data_dir, tmp_path):
    from ponderlm.sweep import Recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS)
    recipe.write_text(recipe.read_text().replace("[0.0, 0.3]", '["1e-4", 0.3]'))
    assert Recipe.load(recipe).taus == [1e-4, 0.3]


def test_a_damaged_evaluation_cache_is_evaluated_again(tiny_data_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS[:1])
    first = run_sweep(recipe, tmp_path / "sweep", progress=False)
    (tmp_path / "sweep" / "runs" / "vanilla" / "sweep_eval.json").write_text('{"step_')
    assert run_sweep(recipe, tmp_path / "sweep", progress=False) == first
    assert "sweep_eval.json is damaged" in capsys.readouterr().err


def test_reuse_of_rows_with_a_missing_or_non_numeric_field_is_refused_before_writing(tiny_data_dir, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS[:1])
    published = tmp_path / "published"
    published.mkdir()
    row = {"method": "vanilla", "run": "vanilla", "seed": 0, "lr": 0.003, "tau": "", "ppl": "abc", "loss": 5.0,
           "inference_flops_per_token": 1.0, "train_flops": 1.0, "train_tokens": 100, "split": "val"}
    for broken, message in ((row, "vanilla's ppl is 'abc', not a number"),
                            ({k: v for k, v in row.items() if k != "loss"}, "a row lacks 'loss'")):
        (published / "results.json").write_text(json.dumps([broken]))
        with pytest.raises(PonderError, match=message):
            run_sweep(recipe, tmp_path / "out", progress=False, reuse=published)
        assert not (tmp_path / "out" / "results.json").exists()


def test_a_diverged_runs_perplexity_is_null_in_results_json_and_inf_again_when_read(tmp_path, tiny_data_dir):
    from ponderlm.sweep.report import read_rows

    rows = [{"method": "vanilla", "run": "v", "seed": s, "lr": 0.1, "tau": "", "ppl": ppl, "loss": loss,
             "inference_flops_per_token": 1.0, "mean_extra_steps": 0.0, "train_flops": 1.0, "train_tokens": 10,
             "split": "val"} for s, (ppl, loss) in enumerate([(float("inf"), float("nan")), (120.0, 4.79)])]
    report.write_results(rows, tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text and json.loads(text)[0]["ppl"] is None
    assert [row["ppl"] for row in read_rows(tmp_path / "results.json")] == [math.inf, 120.0]
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "results.json").write_text("[]")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data_dir, RUNS[:1])
    with pytest.raises(PonderError, match="holds no runs; drop --reuse"):
        run_sweep(recipe, tmp_path / "out", progress=False, reuse=tmp_path / "published")
