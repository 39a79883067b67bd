"""The last lines of `make demo`: PonderLM-3 beside vanilla on the same tokens, and where the reports are.

    python -m ponderlm.demo RUN_DIR VANILLA_RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ponderlm.files import read_jsonl
from ponderlm.rundir import RunDir


def summary(run: Path, vanilla: Path) -> str:
    ours, theirs = (json.loads((path / "eval_test.json").read_text()) for path in (run, vanilla))
    trained = [max(record.get("tokens", 0) for record in read_jsonl(RunDir(path).metrics_file))
               for path in (run, vanilla)]
    return "\n".join([
        "",
        f"test perplexity on the same {ours['tokens']:,} tokens, after training on {trained[0]:,} and {trained[1]:,} "
        "tokens: "
        f"PonderLM-3 {ours['ppl']:.1f} (tau {ours['tau']:g}, {ours['mean_extra_steps']:.2f} extra steps per token), "
        f"vanilla {theirs['ppl']:.1f} (docs/results/pareto-cpu-v2/ compares them at 4 and 16 times these tokens, "
        "with seeds and tuned learning rates)",
        f"reports: {run}/tau_table.md (the tau trade-off, with tokens/s), {run}/analysis/analysis.html (which "
        f"tokens ponder), {run}/analysis/steps_histogram.png, {run}/eval_test.json, {vanilla}/eval_test.json",
    ])


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), Path(sys.argv[2])))
