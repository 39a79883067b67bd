"""PonderLM-3 against PonderLM-2 at the same K: training step time, and decode time beside inference FLOPs.

    .venv/bin/python benchmarks/ponder_speed.py [--ponderlm3-run RUN] [--out FILE]

Training: both methods at the `small` shape (or the runs' configs), one refinement count (R = 2) for both, steps
interleaved so machine noise hits both alike; the ratio of medians is the result (goal <= 1.10).
Decoding: KV-cached decoding of the same prompt and text; wall time per token next to the analytic inference FLOPs
per token of the slots actually run (goal: the two ratios within 10 % of each other). Without a trained run the
ponderlm3 router gets random weights so that tokens keep a mix of 0..K slots, as a trained router does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import ponderlm
from machine import describe_machine
from ponderlm.config import load_config
from ponderlm.engine import Engine, Request
from ponderlm.machine import autocast
from ponderlm.methods import build_model
from ponderlm.train import build_optimizer

PROMPT_IDS = list(range(5, 69))


def models_from_args(args):
    """[ponderlm2, ponderlm3] at the same shape and K. Speed does not depend on the weights, except through how
    many slots the ponderlm3 router keeps: a trained run (--ponderlm3-run) gives the real mix."""
    if args.ponderlm3_run:
        ponderlm3 = ponderlm.load(args.ponderlm3_run)[0]
        config = copy.deepcopy(ponderlm3.config)
    else:
        config = load_config(args.preset, ["method=ponderlm3", "model.vocab_size=8192", f"ponder.extra_steps={args.k}"])
        torch.manual_seed(0)
        ponderlm3 = build_model(config)
        with torch.no_grad():  # a router that spreads tokens over 0..K slots, as trained routers do
            ponderlm3.router.weight.normal_(0, args.router_std)
    config = copy.deepcopy(config)
    config.method = "ponderlm2"
    torch.manual_seed(0)
    return [build_model(config), ponderlm3]


def train_step_times(models, steps: int) -> list[list[float]]:
    times: list[list[float]] = [[], []]
    optimizers = [build_optimizer(m, m.config) for m in models]
    batch = models[0].config.train.micro_batch_size
    seq = models[0].config.data.seq_len
    ids = torch.randint(0, models[0].config.model.vocab_size, (batch, seq))
    for model in models:
        model.config.ponder.train_refine_passes = [2]
        model.train()
    for round_index in range(steps + 1):
        order = [0, 1] if round_index % 2 == 0 else [1, 0]
        for i in order:
            model, optimizer = models[i], optimizers[i]
            start = time.perf_counter()
            with autocast(model.config):
                loss, _ = model.loss(ids, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index > 0:  # the first round warms up allocators and kernels
                times[i].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def decode_stats(model, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(seconds per token, inference FLOPs per token, mean extra steps) for decoding of a fixed text, one sequence.

    The text is fed after the prompt as part of it (teacher forcing): exactly the per-token work of generation, on the
    same tokens for both models, so the router's decisions are not steered by one model's own samples.
    """
    model.eval()
    text = torch.randint(0, model.config.model.vocab_size, (new_tokens,), generator=torch.Generator().manual_seed(1))
    best = float("inf")
    for _ in range(repeats):
        engine = Engine(model, max_batch=1, max_tokens=len(PROMPT_IDS) + new_tokens)
        sequence = engine.add(Request(PROMPT_IDS + text.tolist()))
        while sequence.fed < len(PROMPT_IDS) or not engine.between_tokens[0]:
            engine.step()
        start = time.perf_counter()
        list(engine.stream())
        best = min(best, (time.perf_counter() - start) / new_tokens)
    # Only the timed tokens, which also attend to the prompt's slots.
    slots = torch.tensor([sequence.extra_steps])
    prompt = len(PROMPT_IDS)
    flops = model.inference_flops(slots) - model.inference_flops(slots[:, :prompt])
    return best, flops / new_tokens, slots[:, prompt:].float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--ponderlm3-run", help="a trained ponderlm3 run (default: untrained, router spread by hand)")
    parser.add_argument("--router-std", type=float, default=1.0, help="untrained router weight std")
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/ponder_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = models_from_args(args)
    shape = models[0].config.model
    train_times = train_step_times(models, args.train_steps)
    med = [statistics.median(t) for t in train_times]
    paired = statistics.median(b / a for a, b in zip(*train_times))  # same round, so the same machine load
    dec = [decode_stats(m, args.decode_tokens, args.decode_repeats) for m in models]
    time_ratio, flops_ratio = dec[1][0] / dec[0][0], dec[1][1] / dec[0][1]

    lines = [
        "# PonderLM-3 vs PonderLM-2: training step and decode speed", "",
        "```", " ".join([Path(sys.executable).name, *sys.argv]), "```", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {describe_machine()}, "
        f"load average {Path('/proc/loadavg').read_text().split()[0]}",
        f"- shape: d={shape.hidden_size}, layers={shape.num_hidden_layers}, heads={shape.num_attention_heads}, "
        f"vocab={shape.vocab_size}, K={models[0].config.ponder.extra_steps}, seq={models[0].config.data.seq_len}, "
        f"micro-batch={models[0].config.train.micro_batch_size}, dtype={models[0].config.train.dtype}, R=2",
        f"- ponderlm3: {'trained run ' + args.ponderlm3_run if args.ponderlm3_run else 'untrained, router weights ~ N(0, %g)' % args.router_std}"
        f"; ponderlm2: same shape, untrained (speed does not depend on its weights)",
        "", "| measure | ponderlm2 | ponderlm3 | ponderlm3 / ponderlm2 |", "|---|---|---|---|",
        f"| train step, median of {args.train_steps} (s) | {med[0]:.3f} | {med[1]:.3f} | {med[1] / med[0]:.3f} |",
        f"| train step, median of per-round ratios | | | **{paired:.3f}** |",
        f"| decode, s per token (best of {args.decode_repeats}) | {dec[0][0] * 1e3:.2f} ms | {dec[1][0] * 1e3:.2f} ms "
        f"| **{time_ratio:.3f}** |",
        f"| inference FLOPs per token | {dec[0][1]:.4g} | {dec[1][1]:.4g} | **{flops_ratio:.3f}** |",
        f"| mean extra steps of the generated tokens | {dec[0][2]:.2f} | {dec[1][2]:.2f} | |",
        "", f"Decode time ratio / FLOPs ratio = {time_ratio / flops_ratio:.3f} (goal: within 0.90..1.10).", "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
