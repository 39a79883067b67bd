"""One-GPU check at the paper's 410M shape: MFU and peak memory of a training step for vanilla, ponderlm2 and
ponderlm3, decode tokens/s, and the ponderlm3 soft mask through SDPA (augmented q.k) against flex_attention.

    bash benchmarks/gpu_check.sh            # about 5 minutes on one H200; writes $OUT/gpu_check.md (or ./)

Synthetic token ids (speed does not depend on the data). MFU = analytic training FLOPs per token (flops.py) x
tokens/s / the GPU's dense bf16 peak (--peak-tflops, 989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ponderlm.config import load_config
from ponderlm.engine import Engine, Request
from ponderlm.machine import autocast
from ponderlm.methods import build_model
from ponderlm.train import build_optimizer


def timed(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: kernels, allocator, compiled graphs
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_row(method: str, args, backend: str = "sdpa") -> dict:
    overrides = [f"method={method}", f"model.vocab_size={args.vocab}", f"ponder.extra_steps={args.k}",
                 "ponder.train_refine_passes=[2]", f"data.seq_len={args.seq_len}", "train.dtype=bf16",
                 f"model.attention_backend={backend}"]
    config = load_config("410m", overrides)
    torch.manual_seed(0)
    model = build_model(config).cuda()
    optimizer = build_optimizer(model, config)
    batch = args.batch if method == "vanilla" else args.latent_batch
    ids = torch.randint(0, args.vocab, (batch, args.seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(config, "cuda"):
            loss, _ = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, args.repeats)
    tokens_per_s = batch * args.seq_len / seconds
    flops = model.training_flops_per_token() * tokens_per_s
    row = {"method": method, "backend": backend, "batch": batch, "step_s": seconds, "tokens_per_s": tokens_per_s,
           "mfu": flops / (args.peak_tflops * 1e12), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if method != "ponderlm3" or backend == "sdpa":
        row["decode_tokens_per_s"] = decode_rate(model, config, args)
    return row


@torch.no_grad()
def decode_rate(model, config, args) -> float:
    """Greedy new tokens/s of one sequence through the engine, after its 128-token prompt (not timed)."""
    engine = Engine(model, max_batch=1, max_tokens=128 + args.decode_tokens + 1)
    sequence = engine.add(Request(torch.randint(0, args.vocab, (128,)).tolist(), args.decode_tokens + 1))
    while not sequence.tokens:
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.busy:
        engine.step()
    torch.cuda.synchronize()
    model.train()
    return args.decode_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent-batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    rows = []
    for method, backend in [("vanilla", "sdpa"), ("ponderlm2", "sdpa"), ("ponderlm3", "sdpa"), ("ponderlm3", "flex")]:
        rows.append(train_row(method, args, backend))
        torch.cuda.empty_cache()  # each model's memory is freed once train_row returns
    lines = ["# GPU check: 410M shape", "", "```", " ".join(sys.argv), "```", "",
             f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, seq "
             f"{args.seq_len}, K={args.k}, R=2, peak {args.peak_tflops} TFLOP/s", "",
             "| method | attention | batch | step (s) | tokens/s | MFU | peak memory (GiB) | decode tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else ""
        lines.append(f"| {r['method']} | {r['backend']} | {r['batch']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} "
                     f"| {r['mfu']:.1%} | {r['peak_gib']:.1f} | {decode} |")
    sdpa, flex = rows[2]["step_s"], rows[3]["step_s"]
    lines += ["", f"ponderlm3 soft mask: flex / sdpa step time = {flex / sdpa:.3f} "
              f"(use model.attention_backend={'flex' if flex < sdpa else 'sdpa'} on this GPU)"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
