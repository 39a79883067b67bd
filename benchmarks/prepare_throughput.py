"""`data prepare` at scale: MB/s and peak memory on a generated corpus, against `tokenizers` alone, in one run.

The corpus: --gigabytes of jsonl (several files), documents of 1-6 KB cut from the default corpus's text at random
(deterministic), so the tokenizer sees real English. The tokenizer: a BPE (vocab 8,192) trained once on the first
64 MB, passed to prepare with --tokenizer so that the timed prepare is reading, splitting, tokenizing and writing.

Contenders, in this order:
- `tokenizers` alone: the same documents' texts already in memory, `Tokenizer.encode_batch` over batches of 1,000
  (its own thread pool: every core), only the encode calls timed — the ceiling;
- `ponderlm data prepare --workers N` as a subprocess, wall time from start to exit (including Python start-up),
  peak memory (PSS) of its whole process tree (main + workers) sampled every 50 ms;
- `tokenizers` alone again (the machine is shared; the ratio uses the mean of both).
The ratio is prepare's text MB/s over the tokenizer's. With --with-bpe, one more prepare trains its own BPE on the
default --tokenizer-sample-bytes (256 MiB) of the corpus first and reports that phase's time and memory.

Usage (from the repo root; needs ~2.5x --gigabytes of free disk in --work):
    .venv/bin/python benchmarks/prepare_throughput.py --gigabytes 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import machine_info  # noqa: E402
from ponderlm.data.corpus import fetch_default_corpus  # noqa: E402
from ponderlm.data.prepare import resolve_cache_dir  # noqa: E402
from ponderlm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=1.0, help="corpus size (jsonl bytes)")
    p.add_argument("--files", type=int, default=8, help="jsonl files the corpus is spread over")
    p.add_argument("--workers", type=int, help="prepare's --workers (default: every core)")
    p.add_argument("--work", default="/tmp/ponderlm-prepare-bench", help="corpus, tokenizer and outputs go here")
    p.add_argument("--with-bpe", action="store_true", help="also time a prepare that trains its BPE on a sample")
    p.add_argument("--out", default="benchmarks/results/prepare_throughput.md")
    return p.parse_args(argv)


def generate_corpus(folder: Path, gigabytes: float, files: int) -> list[Path]:
    """Deterministic jsonl files of real-text documents; reused when already there with the same size."""
    target = int(gigabytes * 1e9)
    paths = [folder / f"part-{i:03d}.jsonl" for i in range(files)]
    stamp = folder / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"bytes": target, "files": files}:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    docs, _ = fetch_default_corpus(resolve_cache_dir())
    text = "\n".join(d.text for d in docs)
    rng = random.Random(0)
    per_file = target // files
    for path in paths:
        written = 0
        with open(path, "w") as handle:
            while written < per_file:
                start = rng.randrange(len(text) - 8000)
                line = json.dumps({"id": written, "text": text[start:start + rng.randint(1000, 6000)]}) + "\n"
                handle.write(line)
                written += len(line.encode())
    stamp.write_text(json.dumps({"bytes": target, "files": files}))
    return paths


def bench_tokenizer(tok, paths: list[Path]) -> tuple[float, int]:
    """(seconds in encode_batch, text bytes) over every document, texts loaded first (not timed)."""
    seconds, text_bytes = 0.0, 0
    for path in paths:
        with open(path) as handle:
            texts = [json.loads(line)["text"] for line in handle]
        text_bytes += sum(len(t.encode()) for t in texts)
        for i in range(0, len(texts), 1000):
            started = time.perf_counter()
            tok.encode_batch(texts[i:i + 1000], add_special_tokens=False)
            seconds += time.perf_counter() - started
    return seconds, text_bytes


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and all its descendants (Linux /proc): pages shared between the forked
    workers and their parent count once, which summing RSS would not."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:"))) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def run_prepare(command: list[str]) -> tuple[float, int, dict]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_pss(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"prepare failed: {process.stderr.read()[-2000:]}")
    out = Path(command[command.index("--out") + 1])
    return seconds, peak, json.loads((out / "metadata.json").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    paths = generate_corpus(work / "corpus", args.gigabytes, args.files)
    corpus_bytes = sum(p.stat().st_size for p in paths)
    tokenizer_file = work / "tokenizer.json"
    if not tokenizer_file.is_file():
        with open(paths[0]) as handle:
            sample = [json.loads(line)["text"] for _, line in zip(range(20_000), handle)]
        save_tokenizer(train_tokenizer(sample, 8192), tokenizer_file)
    tok = load_tokenizer(tokenizer_file)
    prepare = [sys.executable, "-m", "ponderlm", "data", "prepare", "--files", str(work / "corpus"),
               "--overwrite"] + (["--workers", str(args.workers)] if args.workers else [])

    first, text_bytes = bench_tokenizer(tok, paths)
    seconds, peak, meta = run_prepare(prepare + ["--tokenizer", str(tokenizer_file), "--out", str(work / "out")])
    second, _ = bench_tokenizer(tok, paths)
    bpe = run_prepare(prepare + ["--out", str(work / "out-bpe")]) if args.with_bpe else None
    write_report(args, corpus_bytes, text_bytes, (first, second), (seconds, peak, meta), bpe)


def write_report(args, corpus_bytes, text_bytes, tokenizer_seconds, prepared, bpe) -> None:
    mb = 1e6
    tokenizer_rate = text_bytes / mb / (sum(tokenizer_seconds) / 2)
    seconds, peak, meta = prepared
    tokens = sum(info["tokens"] for info in meta["splits"].values())
    cpu, cores = machine_info()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/prepare_throughput.py", *sys.argv[1:]])

    def tokenizer_row(label: str, took: float) -> str:
        return f"| `tokenizers` encode_batch, {label} | {took:.1f} | {text_bytes / mb / took:.1f} | | | |"

    def prepare_row(label: str, took: float, peak_bytes: int, ratio_format: str) -> str:
        ratio = ratio_format.format(text_bytes / mb / took / tokenizer_rate)
        return (f"| {label} | {took:.1f} | {text_bytes / mb / took:.1f} | {corpus_bytes / mb / took:.1f} | "
                f"{peak_bytes / mb:,.0f} | {ratio} |")

    lines = [
        "# `data prepare` throughput against `tokenizers` alone", "", "```", command, "```", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {cores} cores; "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"- corpus: {corpus_bytes / mb:,.0f} MB of jsonl in {args.files} files ({text_bytes / mb:,.0f} MB of text), "
        f"{tokens:,} tokens; BPE vocab 8,192",
        f"- prepare: {meta['timings']['workers']} workers, {len(meta['splits']['train']['shards'])} train shards", "",
        "| contender | seconds | text MB/s | jsonl MB/s | peak PSS, all processes (MB) | ratio to tokenizers |",
        "|---|---|---|---|---|---|",
        tokenizer_row("first run", tokenizer_seconds[0]),
        prepare_row("`ponderlm data prepare --tokenizer FILE`", seconds, peak, "**{:.2f}**"),
        tokenizer_row("second run", tokenizer_seconds[1]),
    ]
    if bpe is not None:
        b_seconds, b_peak, b_meta = bpe
        label = (f"`ponderlm data prepare` (trains its BPE on {b_meta['tokenizer']['sample_bytes'] / mb:,.0f} MB "
                 f"in {b_meta['tokenizer']['training_seconds']:.0f} s)")
        lines.append(prepare_row(label, b_seconds, b_peak, "{:.2f}"))
    lines += ["", "Timings recorded in the prepared metadata.json: " + json.dumps(meta["timings"])]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
