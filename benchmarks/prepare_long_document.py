"""Peak memory of `data prepare` on one very long document (issue 31: one 47.5 MB jsonl record took 8 minutes and
10.5 GiB before long documents were tokenized in chunks).

    .venv/bin/python benchmarks/prepare_long_document.py --megabytes 47.5 --tokenizer runs/demo/tokenizer.json

The corpus, per --megabytes size: one record of that size (words of this script's own text, drawn by a fixed
generator) and three short records, so that every split has a document. The prepare runs as a subprocess with the
given tokenizer (no BPE training in the measurement) with the default chunking, and with --unchunked also with
chunking off (the module's CHUNK_CHARS and ENCODE_CHARS set past the record's length) at the smallest size, under
`/usr/bin/time -v`: wall time and the maximum resident set of the process tree. Results go to
benchmarks/results/prepare_long_document.md with the command.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from ponderlm.files import atomic_write_text
from ponderlm.machine import describe

RESULTS = Path(__file__).parent / "results" / "prepare_long_document.md"
LAUNCH = ("import sys, ponderlm.data.prepare; module = sys.modules['ponderlm.data.prepare']; chunk = {chunk}; "
          "module.CHUNK_CHARS = module.ENCODE_CHARS = chunk or module.CHUNK_CHARS; "
          "from ponderlm.cli import main; sys.exit(main(sys.argv[1:]))")


def corpus(path: Path, megabytes: float) -> None:
    rng = random.Random(0)
    words = [w for w in re.findall(r"[A-Za-z']+", Path(__file__).read_text())] * 3 + ["\n\n", "the", "and"]
    target, parts, size = int(megabytes * 1e6), [], 0
    while size < target:
        piece = " ".join(rng.choice(words) for _ in range(1000))
        parts.append(piece)
        size += len(piece) + 1
    with open(path, "w") as handle:
        handle.write(json.dumps({"text": " ".join(parts)}) + "\n")
        for i in range(3):
            handle.write(json.dumps({"text": f"a short document number {i} " * 50}) + "\n")


def measure(command: list[str]) -> dict:
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"prepare failed:\n{done.stderr[-2000:]}")
    stats = dict(line.strip().split(": ", 1) for line in done.stderr.splitlines() if ": " in line.strip())
    return {"seconds": stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"],
            "max_rss_mib": int(stats["Maximum resident set size (kbytes)"]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, nargs="+", default=[47.5], help="one measurement per size")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--unchunked", action="store_true", help="also measure with chunking off, at the smallest "
                        "size only (at 47.5 MB it took 8 minutes and 10.5 GiB)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in sorted(args.megabytes):
            data = Path(work) / "long.jsonl"
            corpus(data, size)
            chunkings = [("chunks of 1M characters (default)", None)]
            if args.unchunked and size == min(args.megabytes):
                chunkings.append(("one piece (chunking off)", 10**12))
            for label, chunk in chunkings:
                out = Path(work) / f"out{len(rows)}"
                command = [sys.executable, "-c", LAUNCH.format(chunk=chunk), "data", "prepare", "--files",
                           str(data), "--out", str(out), "--tokenizer", args.tokenizer, "--workers", "1"]
                rows.append({"size": size, "label": label, **measure(command)})
    lines = [f"```\n{shlex.join(['python', *sys.argv])}\n```", "",
             "One record of the given size (and three short ones), `data prepare --workers 1` with a given "
             f"tokenizer; machine: {describe()}.", "", "| record (MB) | tokenization | wall time | max RSS (MiB) |",
             "|---|---|---|---|"]
    lines += [f"| {r['size']:g} | {r['label']} | {r['seconds']} | {r['max_rss_mib']:.0f} |" for r in rows]
    atomic_write_text(RESULTS, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
