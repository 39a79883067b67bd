"""Training step time of vanilla at the `small` shape in bf16 autocast against fp32, side by side in one run.

    python benchmarks/bf16_vs_fp32.py --out benchmarks/results/bf16_vs_fp32.md

It is what `train.dtype=auto` rests on: where the CPU lacks native bf16 (AVX512-BF16 or AMX), bf16 autocast is
emulated and far slower than fp32; `auto` then picks fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from machine import describe_machine
from ponderlm.config import load_config
from ponderlm.machine import native_bf16
from ponderlm.files import atomic_write_text
from ponderlm.methods import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; the first is warm-up")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(load_config("small", ["method=vanilla", "model.vocab_size=8192"]))
    ids = torch.randint(0, 8192, (16, 256))
    precisions = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in precisions}
    for _ in range(args.rounds):
        for name, context in precisions.items():
            start = time.perf_counter()
            with context():
                loss = model.loss(ids, ids)[0]
            loss.backward()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t[1:]) for name, t in times.items()}
    lines = ["# bf16 autocast against fp32: vanilla training step (forward + backward), `small` shape", "",
             f"Command: `python {' '.join(sys.argv)}`", f"Machine: {describe_machine()}; native bf16: "
             f"{native_bf16('cpu')}", f"Batch 16 x 256 tokens, best of rounds 2-{args.rounds}, alternating.", "",
             "| precision | step (s) | tokens/s |", "|---|---|---|"]
    lines += [f"| {name} | {best[name]:.3f} | {ids.numel() / best[name]:.0f} |" for name in precisions]
    lines += ["", f"bf16 step time / fp32 step time: **{best['bf16'] / best['fp32']:.1f}**"]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
