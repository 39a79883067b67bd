"""Training throughput side by side: HF transformers' LlamaForCausalLM against our methods, in one run.

Every contender does the same work per step: forward, loss, backward, gradient clipping to 1.0, an AdamW step
(`ponderlm.train.build_optimizer`: betas 0.9/0.95, weight decay 0.1 on >= 2-D weights, the fused kernel), and
zero_grad. HF's loss is `F.cross_entropy(logits.float())` on the full (B, S, V) logits, as a user of
`LlamaForCausalLM` writes it; ours is each method's own `loss` (`Method.lm_loss`: the chunked, fused lm-head +
cross-entropy), compiled as `train.compile` says, under `train.dtype`'s autocast. A contender is `hf` or a method
name, optionally with config overrides after a colon, e.g. `vanilla:train.compile=false`.

Timing: every round runs one step of each contender, in an order that rotates every round, with the same torch seed
(so ponderlm3 draws the same R for every contender); the first --warmup rounds (compilation) are dropped; the
median step time gives tokens/s. Ratios are to HF's tokens/s measured in the same rounds. MFU = model FLOPs per
step (the method's analytic `training_flops_per_token`, the count `sweep` reports; HF counted as vanilla) / step
time / this machine's measured `torch.mm` peak in the same dtype.

Usage (from the repo root):
    .venv/bin/python benchmarks/train_throughput.py                     # hf, vanilla, ponderlm3 at the small shape
    .venv/bin/python benchmarks/train_throughput.py --contenders hf,vanilla,vanilla:train.compile=false --profile
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import describe_machine  # noqa: E402
from ponderlm import distributed  # noqa: E402
from ponderlm.config import load_config  # noqa: E402
from ponderlm.machine import autocast, native_bf16  # noqa: E402
from ponderlm.hf import llama_config_json  # noqa: E402
from ponderlm.methods import build_model  # noqa: E402
from ponderlm.train import build_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", default="hf,vanilla,ponderlm3",
                   help="comma-separated: hf, or a method with optional overrides after ':' joined by ';'")
    p.add_argument("--preset", default="small", help="shape and ponder settings of our methods (and HF's shape)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where this CPU computes it natively, else fp32 (as train.dtype=auto)")
    p.add_argument("--steps", type=int, default=6, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds (compilation happens here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="append torch.profiler's top ops of one step each")
    p.add_argument("--out", default="benchmarks/results/train_throughput.md")
    return p.parse_args(argv)


class Contender:
    def __init__(self, spec: str, args):
        self.spec = spec
        name, _, overrides = spec.partition(":")
        method = "vanilla" if name == "hf" else name
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if native_bf16("cpu") else "fp32")
        self.config = load_config(args.preset, [f"method={method}", f"model.vocab_size={args.vocab}",
                                                f"train.dtype={dtype}", *filter(None, overrides.split(";"))])
        torch.manual_seed(0)
        self.model = build_hf(self.config) if name == "hf" else build_model(self.config)
        self.model.train()
        if name == "hf":
            self.loss = lambda x, y: F.cross_entropy(self.model(input_ids=x, use_cache=False).logits.float()
                                                     .flatten(0, 1), y.flatten())
            self.flops_per_token = build_model(self.config).training_flops_per_token()
        else:
            wrapped = distributed.parallelize(self.model, "none", distributed.Topology(), self.config.train.compile)
            self.loss = lambda x, y: wrapped(x, y, train_step=10**9)[0]  # past any warm-up schedule
            self.flops_per_token = self.model.training_flops_per_token()
        self.optimizer = build_optimizer(self.model, self.config)
        self.times: list[float] = []

    def step(self, inputs, targets) -> float:
        start = time.perf_counter()
        with autocast(self.config, "cpu"):
            loss = self.loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.item()
        return time.perf_counter() - start


def build_hf(config):
    """The LlamaForCausalLM our vanilla exports as (`ponderlm.hf.llama_config_json`), with SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig.from_dict({**llama_config_json(config), "use_cache": False, "attention_dropout": 0.0})
    hf_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_config)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        torch.mm(a, b)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def profile_step(contender: Contender, inputs, targets) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contender.step(inputs, targets)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)


def run_rounds(contenders: list[Contender], inputs, targets, args) -> None:
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            torch.manual_seed(round_index)  # the same draws (ponderlm3's R) for every contender in a round
            seconds = contender.step(inputs, targets)
            if round_index >= args.warmup:
                contender.times.append(seconds)
        print(f"round {round_index}: " + "  ".join(f"{c.spec} {c.times[-1] if c.times else float('nan'):.2f}s"
                                                   for c in contenders), flush=True)


def report(contenders: list[Contender], tokens: int, peak: float, args, command: str, load: tuple) -> list[str]:
    reference = next((c for c in contenders if c.spec == "hf"), contenders[0])
    dtype = contenders[0].config.train.dtype
    lines = ["# Training throughput side by side", "", "```", command, "```", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
             f"{describe_machine()}; load average before/after {load[0]:.2f}/{os.getloadavg()[0]:.2f}",
             f"- preset `{args.preset}`, vocab {args.vocab}, {tokens} tokens per step, dtype {dtype}; "
             f"torch.mm 2048^3 peak {peak / 1e9:.1f} GFLOP/s",
             f"- {args.warmup} warm-up rounds dropped, median of {args.steps} rounds; ratios are to "
             f"`{reference.spec}` in the same rounds", "",
             "| contender | step (s) | tokens/s | tokens/s ratio | paired ratio | model GFLOP/step | MFU | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for c in contenders:
        median = statistics.median(c.times)
        paired = statistics.median(r / s for r, s in zip(reference.times, c.times))
        flops = c.flops_per_token * tokens
        lines.append(f"| `{c.spec}` | {median:.3f} | {tokens / median:.0f} | **{statistics.median(reference.times) / median:.3f}** "
                     f"| {paired:.3f} | {flops / 1e9:.1f} | {100 * flops / median / peak:.1f}% | {c.last_loss:.4f} |")
    lines += ["", "tokens/s ratio = reference median step / contender median step; paired ratio = median over rounds "
              "of the same ratio within a round (robust to load that changes between rounds)."]
    return lines


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/train_throughput.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()
    contenders = [Contender(spec, args) for spec in args.contenders.split(",")]
    config = contenders[0].config
    batch, seq = config.train.micro_batch_size, config.data.seq_len
    tokens = torch.randint(0, args.vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    peak = matmul_peak(torch.bfloat16 if config.train.dtype == "bf16" else torch.float32)
    run_rounds(contenders, inputs, targets, args)
    lines = report(contenders, inputs.numel(), peak, args, command, load)
    if args.profile:
        for c in contenders:
            lines += ["", f"## Profile of one step: `{c.spec}` (sorted by self CPU time)", "", "```",
                      profile_step(c, inputs, targets).rstrip(), "```"]
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(contenders)]) + f"\nwrote {out}")


if __name__ == "__main__":
    main()
