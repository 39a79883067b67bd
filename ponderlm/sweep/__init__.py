"""`ponderlm sweep RECIPE.yaml --out DIR`: train every run of a recipe, evaluate all of them the same way, and write
the perplexity-versus-inference-FLOPs table and plot.

A recipe names a base config, overrides shared by every run, the runs (each a name plus its own overrides), the
evaluation (`split` of every reported number, val or test; `search_split`, val by default, the tokens the
learning-rate search compares on, so that a test-split report is held out from every choice; token budget; and
scoring, `exact` by default, `jacobi` for the parallel forward: see `ponderlm eval --scoring`), the tau values swept
for every run of a prunable method, and optionally the protocol that makes a comparison believable: a learning-rate
grid (each run trains at every lr with its first seed and keeps the lr with the lowest search loss, at the first tau
for prunable methods; `lr_search: local` walks from the middle of the grid toward lower loss instead, and stops
where both neighbours are worse) and seeds (every run repeated; the table and plot give mean +- std over seeds,
results.csv one row per seed):

    base: small
    set: [train.steps=2000, train.dtype=fp32]
    eval: {split: test, search_split: val, max_tokens: 65536}
    taus: [1.0e-4, 1.0e-2, 0.1]
    lrs: [1.0e-3, 3.0e-3, 6.0e-3]
    seeds: [0, 1, 2]
    compare_to: ponderlm3
    primary: [vanilla]
    runs:
      - {name: vanilla, set: [method=vanilla], seeds: [0, 1, 2, 3, 4]}    # a run may override lrs and seeds
      - {name: ponderlm3-l1e-3, set: [method=ponderlm3, ponder.penalty=1.0e-3]}
      - {name: ponderlm3-l1e-3-4x, set: [method=ponderlm3, train.steps=8000], lr_from: ponderlm3-l1e-3}

`lr_from` reuses the learning rate an earlier run chose (a longer budget need not search again). With
`compare_to: ponderlm3`, results.md tests (ponderlm/sweep/stats.py: Welch's t-test, Holm-adjusted) whether that
method is better or worse at equal data (same training tokens, no more inference FLOPs) and at equal compute (no
more training and inference FLOPs); the runs named in `primary` are the comparisons decided on before the sweep ran,
adjusted as a family of their own.

Every run's first seed comes first, in recipe order, then the other seeds that still have to train: a long sweep
publishes a one-seed picture of every run before it adds seeds. `order: run_by_run` trains every seed of a run
before the next one instead, so the comparisons come in the recipe's order of priority. The tables list runs in
recipe order.

Resumable: the tables are rewritten after every run, a finished run is not retrained, an interrupted one continues
from its last checkpoint, and an evaluation already stored in the run directory (same split, token budget and tau)
is reused. `--reuse DIR` takes the runs (and learning-rate search losses) a published sweep directory holds in its
results.json and lr_search.json instead of training them again, for a run with no directory under --out: a sweep
whose run directories were lost, or that moves to another machine, continues from what it published. A
timestamped line per run goes to stderr as it starts (or resumes) and ends.
"""

from ponderlm.sweep.recipe import Recipe, run_dir_name
from ponderlm.sweep.report import write_results
from ponderlm.sweep.runner import rewrite_report, run_sweep

__all__ = ["Recipe", "rewrite_report", "run_dir_name", "run_sweep", "write_results"]
