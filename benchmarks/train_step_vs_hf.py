"""Training-step time of ponderlm's vanilla model vs HF transformers' LlamaForCausalLM at an identical shape.

Both models do the same work per step: forward, loss, backward, grad-norm clipping to 1.0, AdamW step
(betas 0.9/0.95, lr 1e-3, weight decay 0.1 on >=2-D weights and 0 on norms, exactly `ponderlm.train.build_optimizer`),
zero_grad(set_to_none=True). Loss: both compute `F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())` on
the full (B, S, V) logits -- ours through `Vanilla.loss`, which does exactly that; HF by calling the model without
`labels` and applying the same expression, so the loss cost is identical (HF's `labels=` path would shift the labels
and use its own loss function). bf16 runs wrap forward + loss in `torch.autocast('cpu', dtype=torch.bfloat16)` for both,
as `ponderlm.train` does; parameters and optimizer state stay fp32.

Timing: steps alternate between the two models (the order flips every round), the first --warmup rounds are discarded,
and the median of --steps timed steps per model is reported, so machine noise hits both alike.

Achieved FLOP/s: matmul FLOPs of one full training step counted with `torch.utils.flop_counter.FlopCounterMode`
(forward + backward; it does not count the CPU flash-attention kernel) plus analytic causal attention FLOPs
(3 x 4 * layers * d * B * S(S+1)/2: q.k and p.v over the visible keys, backward = 2x forward), divided by the median
step time and compared with this machine's measured `torch.mm` peak for the same dtype.

Usage (from the repo root):
    .venv/bin/python benchmarks/train_step_vs_hf.py                        # small preset shape
    .venv/bin/python benchmarks/train_step_vs_hf.py --hidden-size 512 --layers 8 --heads 8 --seq-len 512 --batch 4 \
        --out benchmarks/results/train_step_vs_hf_d512.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from machine import machine_info  # noqa: E402
from ponderlm.config import load_config  # noqa: E402
from ponderlm.methods import build_model  # noqa: E402
from ponderlm.train import build_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per step)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per dtype")
    p.add_argument("--warmup", type=int, default=3, help="discarded rounds per dtype")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mm-size", type=int, default=2048, help="n of the n x n torch.mm peak measurement")
    p.add_argument("--profile", action="store_true",
                   help="also profile a few steps of each model with torch.profiler and append the top ops")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/train_step_vs_hf.md")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- models

def build_ours(args):
    overrides = [f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden_size}",
                 f"model.num_hidden_layers={args.layers}", f"model.num_attention_heads={args.heads}",
                 "model.rms_norm_eps=1e-5", "model.rope_theta=10000.0", f"data.seq_len={args.seq_len}",
                 f"train.micro_batch_size={args.batch}", "train.lr=1e-3", "train.beta1=0.9", "train.beta2=0.95",
                 "train.weight_decay=0.1", "train.grad_clip=1.0"]
    config = load_config("small", overrides)
    model = build_model(config)
    return config, model


def build_hf(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.resolved_intermediate_size(),
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, hidden_act="silu", max_position_embeddings=config.data.seq_len,
        rms_norm_eps=m.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return hf_config, model


def ours_loss(model, inputs, targets):
    return model.loss(inputs, targets)[0]


def hf_loss(model, inputs, targets):
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Runner:
    def __init__(self, name, model, loss_fn, config, grad_clip):
        self.name, self.model, self.loss_fn, self.grad_clip = name, model, loss_fn, grad_clip
        self.model.train()
        self.optimizer = build_optimizer(model, config)
        self.times: list[float] = []

    def step(self, inputs, targets, dtype):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = self.loss_fn(self.model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()


# ----------------------------------------------------------------------------------------------------- measurements

def matmul_peak(n, dtype, repeats=10):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def counted_matmul_flops(runner, inputs, targets, dtype):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = runner.loss_fn(runner.model, inputs, targets)
        loss.backward()
    runner.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def attention_flops(args):
    visible = args.seq_len * (args.seq_len + 1) / 2  # causal key-query pairs per sequence
    return 3 * 4 * args.layers * args.hidden_size * args.batch * visible


def profile_model(runner, inputs, targets, dtype, steps):
    from torch.profiler import ProfilerActivity, profile

    runner.step(inputs, targets, dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step(inputs, targets, dtype)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


# ------------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: unknown dtype {d!r}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/train_step_vs_hf.py",
                                                *(sys.argv[1:] if argv is None else argv)])

    load_start = os.getloadavg()
    torch.manual_seed(0)
    config, ours = build_ours(args)
    hf_config, hf = build_hf(config)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"parameter counts differ: ours {n_ours:,} vs HF {n_hf:,}")
    print(f"params: ours {n_ours:,}  HF {n_hf:,}", flush=True)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_tokens = inputs.numel()

    peaks = {"fp32": matmul_peak(args.mm_size, torch.float32), "bf16": matmul_peak(args.mm_size, torch.bfloat16)}
    print("mm peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    rows = []
    profiles = []
    for dtype in dtypes:
        r_ours = Runner("ours", ours, ours_loss, config, config.train.grad_clip)
        r_hf = Runner("hf", hf, hf_loss, config, config.train.grad_clip)
        flops = {r.name: counted_matmul_flops(r, inputs, targets, dtype) + attention_flops(args) for r in (r_ours, r_hf)}
        losses = {}
        for rnd in range(args.warmup + args.steps):
            order = (r_ours, r_hf) if rnd % 2 == 0 else (r_hf, r_ours)
            for r in order:
                t, loss = r.step(inputs, targets, dtype)
                losses[r.name] = loss
                if rnd >= args.warmup:
                    r.times.append(t)
            print(f"[{dtype}] round {rnd}: ours {r_ours.times[-1] if r_ours.times else float('nan'):.3f}s "
                  f"hf {r_hf.times[-1] if r_hf.times else float('nan'):.3f}s", flush=True)
        med_ours, med_hf = statistics.median(r_ours.times), statistics.median(r_hf.times)
        paired = statistics.median(a / b for a, b in zip(r_ours.times, r_hf.times))
        rows.append(dict(dtype=dtype, ours=med_ours, hf=med_hf, ratio=med_ours / med_hf, paired=paired,
                         ours_min=min(r_ours.times), hf_min=min(r_hf.times),
                         ours_flops=flops["ours"], hf_flops=flops["hf"], peak=peaks[dtype],
                         loss_ours=losses["ours"], loss_hf=losses["hf"]))
        if args.profile:
            for r in (r_ours, r_hf):
                profiles.append((dtype, r.name, profile_model(r, inputs, targets, dtype, args.profile_steps)))
        del r_ours, r_hf

    cpu, cores = machine_info()
    load_end = os.getloadavg()
    lines = [
        "# Training step: ponderlm vanilla vs HF LlamaForCausalLM",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu}, {cores} cores, torch.set_num_threads({args.threads}), torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}",
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load_end)} (above ~0 means other processes shared the {cores} cores)",
        f"- shape: hidden {args.hidden_size}, layers {args.layers}, heads {args.heads}, intermediate "
        f"{config.model.resolved_intermediate_size()}, vocab {args.vocab}, seq {args.seq_len}, micro-batch "
        f"{args.batch} ({n_tokens} tokens/step), untied embeddings, no biases, rms eps 1e-5, rope theta 10000, SDPA",
        f"- parameters: ours {n_ours:,}, HF {n_hf:,} ({'equal' if n_ours == n_hf else 'DIFFERENT'})",
        "- step: forward + F.cross_entropy(logits.float()) + backward + clip_grad_norm_(1.0) + AdamW(0.9/0.95, "
        "lr 1e-3, wd 0.1) step + zero_grad; bf16 = autocast over forward+loss",
        f"- timing: ours/HF alternate each round (order flips), {args.warmup} warm-up rounds dropped, median of "
        f"{args.steps} steps each",
        f"- torch.mm {args.mm_size}x{args.mm_size} peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        "",
        "| dtype | ours median (s) | HF median (s) | ours/HF | paired ours/HF | ours min (s) | HF min (s) "
        "| step GFLOP (ours / HF) | ours GFLOP/s | ours % of mm peak | HF GFLOP/s | HF % of mm peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours_rate, hf_rate = r["ours_flops"] / r["ours"], r["hf_flops"] / r["hf"]
        lines.append(
            f"| {r['dtype']} | {r['ours']:.3f} | {r['hf']:.3f} | **{r['ratio']:.3f}** | {r['paired']:.3f} | {r['ours_min']:.3f} | "
            f"{r['hf_min']:.3f} | {r['ours_flops'] / 1e9:.1f} / {r['hf_flops'] / 1e9:.1f} | {ours_rate / 1e9:.1f} | "
            f"{100 * ours_rate / r['peak']:.1f}% | {hf_rate / 1e9:.1f} | {100 * hf_rate / r['peak']:.1f}% |")
    lines += ["", "ours/HF = ratio of the medians; paired ours/HF = median over rounds of (our step / HF's step in the "
              "same round), less sensitive to load that changes between rounds. GFLOP/s use the median step.",
              "", "Goal: ours/HF <= 0.9 in every dtype: "
              + ", ".join(f"{r['dtype']} {'met' if r['ratio'] <= 0.9 else 'missed'}" for r in rows) + ".", ""]
    lines.append("Step FLOPs = FlopCounterMode matmul FLOPs of one forward+backward (no optimizer) + analytic causal "
                 "attention FLOPs (3 x 4 * L * d * B * S(S+1)/2); last losses (sanity): "
                 + ", ".join(f"{r['dtype']} ours {r['loss_ours']:.3f} / HF {r['loss_hf']:.3f}" for r in rows) + ".")
    for dtype, name, table in profiles:
        lines += ["", f"## Profile: {name}, {dtype} ({args.profile_steps} steps, sorted by self CPU time)", "",
                  "```", table.rstrip(), "```"]
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:25 + len(rows)]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
