"""Why does `pause` stall early in training? Where its predicting slot looks, checkpoint by checkpoint.

    python benchmarks/pause_probe.py RUN_DIR --max-tokens 4096 --out FILE.md

Pause predicts token t + 1 from the last of the K pause slots after token t. Those slots carry one learned,
content-free embedding and sit at token t's RoPE position, so at initialisation the predicting slot knows which
token it follows only through attention, diluted over all (K + 1) t visible slots, two thirds of them identical
pause slots. Vanilla has token t's embedding in its residual stream from the start. The hypothesis: pause first
has to learn to attend to its own token slot, and its loss stays near a model that ignores the current token
until it does. For every checkpoint of the run (train with a small `train.save_every` and a large
`train.keep_last`), on the same validation tokens: the validation loss, and per layer the attention mass (mean over
heads and positions) of the predicting slot on its own token's slot, on the other pause slots, and on earlier
tokens' slots; beside them two reference losses computed from the training split: the unigram cross-entropy (a
model that knows no token at all) and the bigram one (a model that knows exactly the current token).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from machine import describe_machine
from ponderlm.batching import eval_batches
from ponderlm.checkpoint import load_model_weights
from ponderlm.rundir import RunDir
from ponderlm.data import TokenShards
from ponderlm.files import atomic_write_text
from ponderlm.methods import build_model
from ponderlm.methods.baselines import Pause

TRAIN_TOKENS_FOR_COUNTS = 5_000_000


@contextlib.contextmanager
def captured_attention():
    """Record the softmax attention probabilities of every causal SDPA call (layer by layer, in order)."""
    maps, original = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, scale=None, **kwargs):
        scores = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
        if is_causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        maps.append(scores.softmax(-1))
        out = original(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **kwargs)
        torch.testing.assert_close(maps[-1] @ v, out, atol=1e-4, rtol=1e-4)  # the recorded map is the one used
        return out

    F.scaled_dot_product_attention = recording
    try:
        yield maps
    finally:
        F.scaled_dot_product_attention = original


def attention_shares(maps: list[torch.Tensor], tokens: int, K: int) -> list[dict]:
    """Per layer: the predicting slot's mass on its own token slot, its own token's pause slots, earlier slots."""
    slots = K + 1
    predicting = torch.arange(tokens) * slots + K  # the last pause slot of every token
    own_token = torch.arange(tokens) * slots
    shares = []
    for probs in maps:  # (B, H, S, S)
        rows = probs[:, :, predicting, :].mean(dim=(0, 1))  # (T, S)
        own = rows[torch.arange(tokens), own_token]
        own_group = sum(rows[torch.arange(tokens), own_token + j] for j in range(1, slots))
        shares.append({"own_token": own.mean().item(), "own_pauses": own_group.mean().item(),
                       "earlier": (1 - own - own_group).mean().item()})
    return shares


def reference_losses(data_dir: Path, vocab: int, targets: np.ndarray, previous: np.ndarray) -> dict:
    """Unigram and bigram (add-one smoothed) cross-entropy of the validation targets, counted on train."""
    train = TokenShards(data_dir, "train")
    ids = train.read(0, min(len(train), TRAIN_TOKENS_FOR_COUNTS))
    unigram = np.bincount(ids, minlength=vocab) + 1.0
    unigram_nll = -np.log(unigram[targets] / unigram.sum()).mean()
    codes, counts = np.unique(ids[:-1] * vocab + ids[1:], return_counts=True)  # sparse: vocab^2 is too many
    wanted = previous * vocab + targets
    found = np.minimum(np.searchsorted(codes, wanted), len(codes) - 1)
    pair = np.where(codes[found] == wanted, counts[found], 0) + 1.0
    row = np.bincount(ids[:-1], minlength=vocab)[previous] + vocab
    bigram_nll = -np.log(pair / row).mean()
    return {"unigram": float(unigram_nll), "bigram": float(bigram_nll)}


@torch.no_grad()
def probe(run_dir: Path, max_tokens: int) -> tuple[list[dict], dict]:
    config = RunDir(run_dir).read_config()
    model = build_model(config).eval()
    if not isinstance(model, Pause):
        raise SystemExit(f"{run_dir} is a {config.method} run; this probe reads {Pause.name} runs")
    batches = list(eval_batches(TokenShards(Path(config.data.path), "val"), config.data.seq_len, 8, max_tokens))
    rows = []
    for checkpoint in RunDir(run_dir).checkpoints():
        load_model_weights(model, checkpoint)
        nll, count, per_layer = 0.0, 0, None
        for inputs, targets in batches:
            with captured_attention() as maps:
                logits = model.infer(inputs)[0]
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
            shares = attention_shares(maps, inputs.shape[1], model.max_extra_steps)
            per_layer = shares if per_layer is None else [
                {key: a[key] + b[key] for key in a} for a, b in zip(per_layer, shares)]
        per_layer = [{key: value / len(batches) for key, value in layer.items()} for layer in per_layer]
        rows.append({"step": int(checkpoint.name.split("_")[1]), "loss": nll / count, "layers": per_layer})
    inputs = torch.cat([b[0] for b in batches]).flatten().numpy()
    targets = torch.cat([b[1] for b in batches]).flatten().numpy()
    vocab = model.backbone.embed_tokens.num_embeddings
    return rows, reference_losses(Path(config.data.path), vocab, targets, inputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows, reference = probe(args.run_dir, args.max_tokens)
    layers = len(rows[0]["layers"])
    lines = ["# Where pause's predicting slot looks, over training", "", "```",
             "python benchmarks/pause_probe.py " + " ".join(sys.argv[1:]), "```", "",
             f"- run: `{args.run_dir}`; {args.max_tokens} validation tokens; {describe_machine()}",
             f"- reference losses on the same tokens, counted on up to {TRAIN_TOKENS_FOR_COUNTS:,} training tokens "
             f"(add-one): unigram {reference['unigram']:.3f} (ppl {math.exp(reference['unigram']):.0f}), bigram "
             f"{reference['bigram']:.3f} (ppl {math.exp(reference['bigram']):.0f})",
             "- attention: the last pause slot's mass on its own token slot / on its own token's pause slots "
             "(itself included) / on earlier tokens' slots, mean over heads and positions", "",
             "| step | val loss | " + " | ".join(f"layer {i}: own token / own pauses / earlier" for i in range(layers))
             + " |", "|---|---|" + "---|" * layers]
    for row in rows:
        cells = [f"{d['own_token']:.3f} / {d['own_pauses']:.3f} / {d['earlier']:.3f}" for d in row["layers"]]
        lines.append(f"| {row['step']} | {row['loss']:.3f} | " + " | ".join(cells) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
