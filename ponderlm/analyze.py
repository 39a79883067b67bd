"""`ponderlm analyze`: which tokens an adaptive run (ponderlm3, halting, mor) gives more extra steps.

For every scored position t (input token x_t, predicting x_{t+1}) we record
- kept steps K_hat_t: the extra steps the inference path runs (latent slots kept at tau, or the extra recursions a
  recursion router chose): what `eval` counts as FLOPs;
- expected steps sum_{k>=1} w_{t,k}: the soft allocation (a router's or the gates' step distribution; a recursion
  router's distribution over depths; exact scoring reads it where decoding computes it: halting's gates only up to
  the step after the last kept one, on the Jacobi path all K). Both are reported because with a small tau
  hard pruning can keep almost every slot while the soft allocation still varies;
- the predictive entropy of the inference logits and the NLL of x_{t+1}.
`summarize` turns these per-position arrays into the numbers (a pure function, so tests can check it directly);
`analyze_run` measures a run and writes analysis.json, steps_histogram.png and a self-contained analysis.html.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from ponderlm.batching import eval_batches
from ponderlm.schema import check_tau
from ponderlm.engine import inspect
from ponderlm.errors import PonderError
from ponderlm.files import standard_json, atomic_path, atomic_write_text
from ponderlm.machine import autocast
from ponderlm.rundir import RunDir

TABLE_ROWS = 40  # token strings in the per-token table, most frequent first
SHOWN_TOKENS = 2000  # tokens coloured in the HTML page; the numbers use every analysed token
BATCH_TOKENS = 4096  # tokens per forward: keeps the (batch, seq, vocab) logits of a large vocabulary small


@torch.no_grad()
def measure(model, input_ids: torch.Tensor, targets: torch.Tensor, tau: float, scoring: str = "exact"
            ) -> dict[str, torch.Tensor]:
    """Per-position kept steps, expected steps, entropy and NLL for one batch (B, T); every tensor (B, T)."""
    device = model.backbone.lm_head.weight.device
    input_ids, targets = input_ids.to(device), targets.to(device)
    with autocast(model.config, device.type):
        seen = inspect(model, input_ids, tau, scoring)
    log_probs = seen.logits.float().log_softmax(-1)
    return {"kept_steps": seen.extra_steps.cpu(),
            "expected_steps": seen.expected_extra_steps.float().cpu(),
            "entropy": -(log_probs.exp() * log_probs).sum(-1).cpu(),
            "nll": -log_probs.gather(-1, targets[..., None])[..., 0].cpu()}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (kept steps take only K + 1 values, so ties are the rule)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """None where a side is constant (e.g. every token kept all K slots): no correlation is defined there."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize(token_strings: list[str], kept_steps, expected_steps, entropy, nll, max_steps: int) -> dict:
    """The analysis numbers from flat per-position arrays; token_strings[i] is the decoded input token of i."""
    kept = np.asarray(kept_steps, dtype=np.int64)
    arrays = {"kept_steps": kept, "expected_steps": np.asarray(expected_steps, dtype=np.float64),
              "entropy": np.asarray(entropy, dtype=np.float64), "nll": np.asarray(nll, dtype=np.float64)}
    tokens = len(kept)
    counts = np.bincount(kept, minlength=max_steps + 1)[: max_steps + 1]
    correlations = {
        steps: {target: {"pearson": pearson(arrays[steps], arrays[target]),
                         "spearman": pearson(average_ranks(arrays[steps]), average_ranks(arrays[target]))}
                for target in ("entropy", "nll")}
        for steps in ("kept_steps", "expected_steps")}

    groups: dict[str, list[int]] = {}
    for position, string in enumerate(token_strings):
        groups.setdefault(string, []).append(position)
    frequent = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))[:TABLE_ROWS]
    table = []
    for string, positions in frequent:
        index = np.asarray(positions)
        table.append({"token": string, "count": len(positions),
                      "mean_kept_steps": float(arrays["kept_steps"][index].mean()),
                      "mean_expected_steps": float(arrays["expected_steps"][index].mean()),
                      "fraction_pruned": float((arrays["kept_steps"][index] < max_steps).mean()),
                      "mean_entropy": float(arrays["entropy"][index].mean()),
                      "mean_nll": float(arrays["nll"][index].mean())})
    return {"tokens": tokens, "max_steps": max_steps,
            "mean_kept_steps": float(kept.mean()) if tokens else 0.0,
            "mean_expected_steps": float(arrays["expected_steps"].mean()) if tokens else 0.0,
            "fraction_pruned": float((kept < max_steps).mean()) if tokens else 0.0,
            "kept_steps_counts": counts.tolist(),
            "kept_steps_histogram": (counts / max(1, tokens)).tolist(),
            "mean_entropy": float(arrays["entropy"].mean()) if tokens else 0.0,
            "mean_nll": float(arrays["nll"].mean()) if tokens else 0.0,
            "correlations": correlations, "per_token": table}


def analyze_run(run_dir: str | Path, split: str = "test", max_tokens: int = 16384, tau: float | None = None,
                data_path: str | Path | None = None, out_dir: str | Path | None = None, scoring: str = "exact"
                ) -> dict:
    """Measure an adaptive run on the first max_tokens of a split; write the three files; return the summary."""
    run = RunDir(run_dir)
    check_tau(tau)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PonderError(f"--out {out_dir} is a file; give a folder for the analysis files")
    model, tokenizer, shards, _ = run.load_with_data(split, data_path)
    config = model.config
    if not model.adaptive:
        raise PonderError(f"analyze needs a run of an adaptive method; {run} is {config.method}, which runs a "
                          "fixed number of steps for every token")
    model.check_tau_applies(tau)
    tau = model.resolve_tau(tau)

    # eval_batches walks consecutive windows from the start of the split, so concatenating the rows in order gives
    # the held-out text token by token.
    inputs, measured = [], []
    batch_size = max(1, BATCH_TOKENS // config.data.seq_len)
    for batch_inputs, batch_targets in eval_batches(shards, config.data.seq_len, batch_size, max_tokens):
        inputs.append(batch_inputs.flatten())
        measured.append({k: v.flatten() for k, v in measure(model, batch_inputs, batch_targets, tau, scoring).items()})
    if not inputs:
        raise PonderError(f"the {split} split of {data_path or config.data.path} has no tokens to analyse")
    token_ids = torch.cat(inputs).tolist()
    arrays = {key: torch.cat([m[key] for m in measured]).numpy() for key in measured[0]}
    strings = {i: tokenizer.decode([i], skip_special_tokens=False) for i in set(token_ids)}
    token_strings = [strings[i] for i in token_ids]

    summary = {"method": config.method, "run_dir": str(run), "split": split, "tau": tau, "scoring": scoring,
               **summarize(token_strings, max_steps=model.max_extra_steps, **arrays)}
    out_dir = Path(out_dir) if out_dir is not None else run.report_file(RunDir.ANALYSIS)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "analysis.json", "histogram": out_dir / "steps_histogram.png",
             "html": out_dir / "analysis.html"}
    atomic_write_text(files["json"], standard_json(summary, indent=1) + "\n")
    write_histogram(files["histogram"], arrays["expected_steps"], summary)
    shown = slice(0, SHOWN_TOKENS)
    atomic_write_text(files["html"], render_html(summary, token_strings[shown], arrays["kept_steps"][shown],
                                                 arrays["expected_steps"][shown]))
    return {**summary, "files": {name: str(path) for name, path in files.items()}}


def write_histogram(path: Path, expected_steps: np.ndarray, summary: dict) -> None:
    """Two panels: the share of tokens at each kept K_hat, and the distribution of the router's expected steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    max_steps = summary["max_steps"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(range(max_steps + 1), summary["kept_steps_histogram"], color="#3b6ea8")
    left.set_xticks(range(max_steps + 1))
    left.set_xlabel(f"kept latent steps K_hat (tau = {summary['tau']:g})")
    left.set_ylabel("fraction of tokens")
    right.hist(expected_steps, bins=40, range=(0, max_steps), color="#d2691e")
    right.set_xlabel("expected latent steps (router, sum of w_k for k >= 1)")
    right.set_ylabel("tokens")
    figure.suptitle(f"{summary['run_dir']}: {summary['tokens']:,} {summary['split']} tokens")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


def step_colour(expected: float, low: float, high: float) -> tuple[str, str]:
    """Background and text colour: pale yellow (fewest expected steps) to dark red (most), white text on dark."""
    from matplotlib import colormaps

    share = 0.0 if high <= low else min(1.0, max(0.0, (expected - low) / (high - low)))
    red, green, blue, _ = colormaps["YlOrRd"](0.05 + 0.9 * share)
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return f"#{int(red * 255):02x}{int(green * 255):02x}{int(blue * 255):02x}", "#fff" if luminance < 0.5 else "#000"


def visible(string: str) -> str:
    """A token string with its whitespace made visible, for the table."""
    return string.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "(empty)"


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_html(summary: dict, token_strings: list[str], kept_steps, expected_steps) -> str:
    """One self-contained page: the text coloured by expected steps, a legend, the summary and the table.

    The colour scale spans the observed range of expected steps (stated in the legend): a trained router often
    varies within a narrow band that a fixed 0..K scale would paint one colour.
    """
    low, high = (float(np.min(expected_steps)), float(np.max(expected_steps))) if len(expected_steps) else (0.0, 0.0)
    spans = []
    for string, kept, expected in zip(token_strings, kept_steps, expected_steps):
        background, text = step_colour(float(expected), low, high)
        spans.append(f'<span style="background:{background};color:{text}" '
                     f'title="kept {int(kept)}, expected {expected:.3f}">{html.escape(string)}</span>')
    legend = "".join(
        f'<span class="swatch" style="background:{step_colour(v, low, high)[0]};'
        f'color:{step_colour(v, low, high)[1]}">{v:.3f}</span>'
        for v in np.linspace(low, high, 6))
    histogram = ", ".join(f"K_hat={k}: {share:.1%}" for k, share in enumerate(summary["kept_steps_histogram"]))
    correlation_rows = "".join(
        f"<tr><td>{steps.replace('_', ' ')}</td><td>{target}</td><td>{fmt(values['pearson'])}</td>"
        f"<td>{fmt(values['spearman'])}</td></tr>"
        for steps, targets in summary["correlations"].items() for target, values in targets.items())
    table_rows = "".join(
        f"<tr><td><code>{html.escape(visible(row['token']))}</code></td><td>{row['count']}</td>"
        f"<td>{row['mean_kept_steps']:.3f}</td><td>{row['mean_expected_steps']:.3f}</td>"
        f"<td>{row['fraction_pruned']:.1%}</td><td>{row['mean_entropy']:.3f}</td><td>{row['mean_nll']:.3f}</td></tr>"
        for row in summary["per_token"])
    title = f"ponderlm analyze: {html.escape(summary['run_dir'])}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1200px; color: #222; }}
.text {{ white-space: pre-wrap; font-family: Georgia, serif; font-size: 15px; line-height: 1.7;
        border: 1px solid #ccc; padding: 0.8em; }}
.swatch {{ display: inline-block; padding: 0.1em 0.6em; font-size: 13px; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.15em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary['tokens']:,} {html.escape(summary['split'])} tokens, method {summary['method']}, K = {summary['max_steps']},
tau = {summary['tau']:g}. Mean kept latent steps {summary['mean_kept_steps']:.3f}, mean expected steps
{summary['mean_expected_steps']:.3f}; {summary['fraction_pruned']:.1%} of tokens pruned (K_hat &lt; K).
Histogram of kept steps: {histogram}. Mean entropy {summary['mean_entropy']:.3f} nats, mean NLL
{summary['mean_nll']:.3f} nats.</p>
<table><tr><th>steps</th><th>against</th><th>Pearson</th><th>Spearman</th></tr>{correlation_rows}</table>
<h2>The first {len(token_strings):,} tokens, coloured by expected latent steps</h2>
<p>Expected extra steps from the router, lowest to highest among these tokens: {legend}<br>
Hover a token for its kept steps K_hat at tau and its expected steps. Each token is coloured by the steps it runs
before its successor is predicted.</p>
<div class="text">{"".join(spans)}</div>
<h2>The {len(summary['per_token'])} most frequent tokens</h2>
<table><tr><th>token</th><th>count</th><th>mean kept steps</th><th>mean expected steps</th><th>pruned</th>
<th>mean entropy</th><th>mean NLL</th></tr>{table_rows}</table>
</body></html>
"""
