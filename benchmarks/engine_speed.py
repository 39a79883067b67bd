"""The inference engine's throughput: decoding and scoring of vanilla, PonderLM-2 and PonderLM-3, and HF `generate`.

    .venv/bin/python benchmarks/engine_speed.py [--shape small|v2] [--k 3] [--batches 1,8,32] [--rounds 3]

At the `small` preset's shape (or v2's: d 128) with K extra steps, untrained weights (speed does not depend on them,
except through how many slots PonderLM-3's router keeps: its weights are drawn so that tokens spread over 0..K, and
tau is chosen so that about half of the K slots are kept). fp32, 2 torch threads.
- decode: `--prompt` prompt tokens and `--new` greedy new tokens per sequence, B sequences through one engine;
  new tokens per second of the whole run (prompt included, as a user waits for it). HF transformers'
  LlamaForCausalLM.generate at vanilla's shape and the same batch is the reference.
- scoring: B windows of `--score-len` tokens: exact (teacher-forced decoding through the engine) against the
  parallel Jacobi forward (`infer`, the scoring path before the engine, `ponder.eval_refine_passes` of the preset).
Every measurement of a round runs once, in an order that alternates between rounds; the ratios are medians of
per-round ratios (same round, same machine load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from machine import describe_machine
from ponderlm.config import load_config
from ponderlm.engine import Engine, Request, score, teacher_forced
from ponderlm.methods import build_model

SHAPES = {"small": [], "v2": ["model.hidden_size=128"]}


def build(method: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_config("small", [f"method={method}", f"model.vocab_size={args.vocab}", f"ponder.extra_steps={args.k}",
                                   "train.dtype=fp32", f"data.seq_len={max(args.score_len, args.prompt + args.new)}",
                                   *SHAPES[args.shape]])
    model = build_model(config).eval()
    if method == "ponderlm3":
        with torch.no_grad():  # a router that spreads tokens over 0..K slots, as trained routers do
            model.router.weight.normal_(0, args.router_std)
    return model


def half_slot_tau(model, k: int) -> tuple[float, float]:
    """The tau among a few candidates at which the router keeps closest to K / 2 slots on random text."""
    text = torch.randint(0, model.config.model.vocab_size, (4, 96), generator=torch.Generator().manual_seed(1))
    kept = {tau: teacher_forced(model, text, tau)[1].float().mean().item() for tau in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)}
    tau = min(kept, key=lambda t: abs(kept[t] - k / 2))
    return tau, kept[tau]


def prompts(batch: int, args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, args.vocab, (batch, args.prompt), generator=generator).tolist()


def decode_rate(model, batch: int, tau, args) -> tuple[float, float]:
    """(new tokens/s, mean extra steps of every token fed) for `batch` sequences decoded together."""
    engine = Engine(model, max_batch=batch, max_tokens=args.prompt + args.new)
    start = time.perf_counter()
    sequences = engine.run([Request(p, args.new, tau=tau) for p in prompts(batch, args)])
    seconds = time.perf_counter() - start
    steps = [e for s in sequences for e in s.extra_steps]
    return batch * args.new / seconds, sum(steps) / len(steps)


def hf_model(vanilla):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = vanilla.config.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                         intermediate_size=m.resolved_intermediate_size(), num_hidden_layers=m.num_hidden_layers,
                         num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def hf_decode_rate(hf, batch: int, args) -> float:
    ids = torch.tensor(prompts(batch, args))
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    seconds = time.perf_counter() - start
    assert out.shape[1] == args.prompt + args.new
    return batch * args.new / seconds


def score_rate(model, batch: int, tau, scoring: str, args) -> float:
    windows = torch.randint(0, args.vocab, (batch, args.score_len), generator=torch.Generator().manual_seed(3))
    start = time.perf_counter()
    score(model, windows, tau, scoring, max_batch=batch)
    return windows.numel() / (time.perf_counter() - start)


def profile_generation(model, batch: int, tau, args) -> tuple[str, float, float]:
    """The top operators of 40 engine steps once every sequence is generating, with the lm-head calls and the rows
    they scored per step: what bounds decoding at this batch."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, max_batch=batch, max_tokens=args.prompt + args.new)
    sequences = [engine.add(Request(p, args.new, tau=tau)) for p in prompts(batch, args)]
    while not all(s.tokens for s in sequences):
        engine.step()
    calls, rows = [], []
    original = model.logits
    model.logits = lambda states: (calls.append(1), rows.append(len(states)), original(states))[2]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(40):
                engine.step()
    finally:
        del model.logits
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return table, len(calls) / 40, sum(rows) / max(1, len(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--score-batches", default="8,32")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence (> 40: profiles read 40 steps)")
    parser.add_argument("--score-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--router-std", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/engine_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batches = [int(b) for b in args.batches.split(",")]
    score_batches = [int(b) for b in args.score_batches.split(",")]
    models = {name: build(name, args) for name in ("vanilla", "ponderlm2", "ponderlm3")}
    tau, kept = half_slot_tau(models["ponderlm3"], args.k)
    hf = hf_model(models["vanilla"])
    taus = {"vanilla": None, "ponderlm2": None, "ponderlm3": tau}

    jobs = []  # (key, function)
    for batch in batches:
        for name in models:
            jobs.append(((f"decode {name}", batch), lambda n=name, b=batch: decode_rate(models[n], b, taus[n], args)))
        jobs.append((("decode hf", batch), lambda b=batch: (hf_decode_rate(hf, b, args), 0.0)))
    for batch in score_batches:
        for name in ("ponderlm2", "ponderlm3"):
            for scoring in ("exact", "jacobi"):
                jobs.append(((f"score {name} {scoring}", batch),
                             lambda n=name, b=batch, s=scoring: (score_rate(models[n], b, taus[n], s, args), 0.0)))
    results: dict = {key: [] for key, _ in jobs}
    extra: dict = {}
    started = time.perf_counter()
    for round_index in range(args.rounds + 1):
        order = jobs if round_index % 2 == 0 else jobs[::-1]
        for key, job in order:
            rate, steps = job()
            if round_index > 0:  # round 0 warms up allocators and kernels
                results[key].append(rate)
                extra[key] = steps
            print(f"round {round_index} {key}: {rate:,.1f} tokens/s", file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - started) / 60

    def ratio(a, b) -> float:
        return statistics.median(x / y for x, y in zip(results[a], results[b]))

    med = {key: statistics.median(v) for key, v in results.items()}
    lines = [
        "# Inference engine: decode and scoring throughput", "",
        "```", " ".join(["python", *sys.argv]), "```", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {describe_machine()}; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]}; {args.rounds} rounds after a warm-up round, {minutes:.1f} min",
        f"- shape: `{args.shape}` (d={models['vanilla'].config.model.hidden_size}, "
        f"{models['vanilla'].config.model.num_hidden_layers} layers), vocab {args.vocab}, K={args.k}, fp32; "
        f"ponderlm3 router weights ~ N(0, {args.router_std}), tau={tau:g} keeps {kept:.2f} of {args.k} slots on "
        f"random text",
        f"- decode: {args.prompt}-token prompts, {args.new} greedy new tokens each; new tokens/s of the whole run. "
        f"Scoring: windows of {args.score_len} tokens; tokens/s.", "",
        "## Decode (new tokens/s, median of rounds)", "",
        "| B | vanilla | HF generate | ponderlm2 | ponderlm3 | ponderlm3 mean extra steps | vanilla / HF | "
        "**ponderlm3 / ponderlm2** |", "|---|---|---|---|---|---|---|---|"]
    for b in batches:
        lines.append(f"| {b} | {med[('decode vanilla', b)]:,.0f} | {med[('decode hf', b)]:,.0f} | "
                     f"{med[('decode ponderlm2', b)]:,.1f} | {med[('decode ponderlm3', b)]:,.1f} | "
                     f"{extra[('decode ponderlm3', b)]:.2f} | {ratio(('decode vanilla', b), ('decode hf', b)):.2f} | "
                     f"**{ratio(('decode ponderlm3', b), ('decode ponderlm2', b)):.2f}** |")
    flops = (1 + kept) / (1 + args.k)
    lines += ["", f"FLOPs ratio ponderlm3 / ponderlm2 from the slots kept (layer stack only): {flops:.2f}, i.e. a "
              f"throughput ratio of {1 / flops:.2f} if every pruned slot's time were saved.", ""]
    if len(batches) > 1:
        b0, b1 = batches[0], batches[-1]
        lines += [f"ponderlm3 at B = {b1} against its own B = {b0}: "
                  f"**{ratio(('decode ponderlm3', b1), ('decode ponderlm3', b0)):.1f}x**; "
                  f"vanilla: {ratio(('decode vanilla', b1), ('decode vanilla', b0)):.1f}x.", ""]
    lines += ["## Scoring (tokens/s, median of rounds)", "",
              "| B | ponderlm2 exact | ponderlm2 Jacobi | ponderlm3 exact | ponderlm3 Jacobi | "
              "ponderlm2 exact / Jacobi | **ponderlm3 exact / Jacobi** |", "|---|---|---|---|---|---|---|"]
    for b in score_batches:
        lines.append(f"| {b} | {med[('score ponderlm2 exact', b)]:,.0f} | {med[('score ponderlm2 jacobi', b)]:,.0f} | "
                     f"{med[('score ponderlm3 exact', b)]:,.0f} | {med[('score ponderlm3 jacobi', b)]:,.0f} | "
                     f"{ratio(('score ponderlm2 exact', b), ('score ponderlm2 jacobi', b)):.2f} | "
                     f"**{ratio(('score ponderlm3 exact', b), ('score ponderlm3 jacobi', b)):.2f}** |")
    lines += ["", f"Jacobi here runs {models['ponderlm3'].config.ponder.eval_refine_passes} refinement passes (the "
              "preset's `ponder.eval_refine_passes`) and is approximate; exact scoring is the sequential recurrence.",
              "", "## Profiles of engine steps in mid-flight", ""]
    lm_share = models["vanilla"].backbone.lm_head.weight.numel() / models["vanilla"].num_matmul_params()
    lines += ["Once every sequence is generating (the prompt fed): 40 steps each, the lm-head calls per step and the "
              "rows each scored. A PonderLM-2 batch finishes its tokens together, every K + 1 steps; PonderLM-3's rows "
              f"finish at different steps, so its lm-head (vocab x d: {lm_share:.0%} of the layer stack's weights "
              "here) runs on a few rows nearly every step: at small batches, where a step's time is reading "
              "weights, that is the part of the saving not realised.", ""]
    for name, batch in [(n, b) for b in batches for n in ("ponderlm2", "ponderlm3")] + [("vanilla", batches[-1])]:
        table, calls, rows = profile_generation(models[name], batch, taus[name], args)
        lines += [f"{name}, B = {batch}: {calls:.2f} lm-head calls per step, {rows:.1f} rows each", "", "```", table,
                  "```", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
