"""`ponderlm eval`: loss, perplexity and inference FLOPs of a run on a split of its data."""

from __future__ import annotations

import math
from pathlib import Path

from ponderlm.checkpoint import sha256_file
from ponderlm.data import TokenShards, read_metadata
from ponderlm.errors import PonderError
from ponderlm.flops import vanilla_inference_flops_per_token
from ponderlm.runs import load
from ponderlm.train import evaluate_loss


def evaluate_run(run_dir: str | Path, split: str = "val", max_tokens: int | None = None,
                 data_path: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    model, _ = load(run_dir)
    config = model.config
    data_dir = Path(data_path or config.data.path)
    metadata = read_metadata(data_dir)
    data_tokenizer = data_dir / metadata["tokenizer"]["file"]
    if sha256_file(data_tokenizer) != sha256_file(run_dir / "tokenizer.json"):
        raise PonderError(f"the data at {data_dir} was tokenised with another tokenizer than {run_dir}; "
                          "evaluate on data prepared with the run's tokenizer")
    shards = TokenShards(data_dir, split)
    loss, tokens = evaluate_loss(model, config, shards, max_tokens)
    result = {
        "method": config.method,
        "split": split,
        "loss": loss,
        "ppl": math.exp(loss),
        "tokens": tokens,
        "mean_extra_steps": model.extra_steps_per_token(),
        "inference_flops_per_token": vanilla_inference_flops_per_token(
            config, model.backbone.num_matmul_params(), config.data.seq_len),
    }
    words = metadata["splits"][split].get("words")
    if words and tokens == len(shards) - 1:
        # Every token of the split (EOS included, standing in for PTB's <eos>) was scored once.
        result["word_ppl"] = math.exp(loss * tokens / words)
        result["words"] = words
    return result
