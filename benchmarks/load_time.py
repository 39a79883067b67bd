"""How long `ponderlm.load` takes against reading the same weights with `safetensors` alone (issue 34: a 135M model
took 15 s to load, 12 of them a random initialisation the checkpoint then overwrote).

    .venv/bin/python benchmarks/load_time.py --repeats 5

A run directory of SmolLM2-135M's shape (vocab 49,152, hidden 576, 30 layers, 9 heads, 3 key/value heads,
intermediate 1,536, tied embeddings; random weights) is written once per method. Each measurement is a fresh
process (imports done before the clock starts, the checkpoint file in the page cache for every contender alike),
timing one of:
- `safetensors`: `safetensors.torch.load_file` of the checkpoint's model.safetensors, every tensor copied into
  memory (load_file maps the file; the copy is the reading): the floor;
- `ponderlm.load`: the run's config and tokenizer, the model built on the meta device and filled from the
  checkpoint, with the checks every load makes (the checkpoint's sha256 against checksums.json, no NaN or inf);
- `ponderlm.load, unchecked`: the same with the two checks replaced by no-ops, so that the difference is their cost;
- `build_model + load`: the way loading worked before, a randomly initialised model the checkpoint overwrites.
The contenders alternate within each repeat, so that a noisy neighbour hits all of them alike. Results go to
benchmarks/results/load_time.md with the command, machine and medians.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ponderlm.files import atomic_write_text
from ponderlm.machine import describe

RESULTS = Path(__file__).parent / "results" / "load_time.md"
SHAPE = ["model.vocab_size=49152", "model.hidden_size=576", "model.num_hidden_layers=30",
         "model.num_attention_heads=9", "model.num_key_value_heads=3", "model.intermediate_size=1536",
         "model.tie_word_embeddings=true", "model.embedding_scale=false", "data.seq_len=2048"]
MEASURE = {
    "safetensors": ("from safetensors.torch import load_file; from ponderlm.rundir import RunDir",
                    "[t.clone() for t in load_file(RunDir(run).latest_checkpoint() / 'model.safetensors').values()]"),
    "ponderlm.load": ("import ponderlm, ponderlm.rundir, ponderlm.methods, ponderlm.data", "ponderlm.load(run)"),
    "ponderlm.load, unchecked": ("import ponderlm, ponderlm.rundir, ponderlm.methods, ponderlm.data; "
                                 "import ponderlm.checkpoint as c; c._verify_checksum = lambda path: None; "
                                 "c.first_non_finite = lambda state: None", "ponderlm.load(run)"),
    "build_model + load": ("from ponderlm.checkpoint import load_model_weights; from ponderlm.rundir import RunDir; "
                           "from ponderlm.methods import build_model",
                           "load_model_weights(build_model(RunDir(run).read_config()), "
                           "RunDir(run).latest_checkpoint())"),
}
TIMED = ("import sys, time, json, torch; from pathlib import Path; torch.set_num_threads({threads}); {imports}; "
         "run = Path(sys.argv[1]); start = time.perf_counter(); {call}; "
         "print(json.dumps(time.perf_counter() - start))")


def write_run(run: Path, method: str) -> int:
    """A run directory of the 135M shape with random weights; returns its checkpoint's size in bytes."""
    import torch
    from tokenizers import Tokenizer, models

    from ponderlm.rundir import RunDir
    from ponderlm.config import load_config
    from ponderlm.methods import build_model

    config = load_config(None, [f"method={method}", *SHAPE])
    run.mkdir(parents=True)
    rundir = RunDir(run)
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(rundir.tokenizer_file))
    atomic_write_text(rundir.config_file, config.to_yaml())
    torch.manual_seed(0)
    checkpoint = rundir.save_checkpoint(1, build_model(config).state_dict(), {"step": 1}, {"method": method},
                                        keep_last=1)
    return (checkpoint / "model.safetensors").stat().st_size


def measure(name: str, run: Path, threads: int) -> float:
    imports, call = MEASURE[name]
    code = TIMED.format(threads=threads, imports=imports, call=call)
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="vanilla,ponderlm3")
    args = parser.parse_args()
    command = "python benchmarks/load_time.py " + shlex.join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            run = Path(tmp) / method
            size = write_run(run, method)
            measure("safetensors", run, args.threads)  # once untimed: the file into the page cache
            times = {name: [] for name in MEASURE}
            for _ in range(args.repeats):
                for name in MEASURE:
                    times[name].append(measure(name, run, args.threads))
            floor = statistics.median(times["safetensors"])
            for name, seconds in times.items():
                median = statistics.median(seconds)
                rows.append(f"| {method} | {name} | {median:.2f} | {min(seconds):.2f} | {max(seconds):.2f} | "
                            f"{median / floor:.2f} | {size / 2**20:,.0f} |")
                print(rows[-1], flush=True)
    lines = ["# Loading a run against reading its weights", "", f"Command: `{command}`", "",
             f"Machine: {describe()}; {args.threads} threads; {args.repeats} repeats, each contender a fresh process, "
             "alternating.", "",
             "| method | how | median s | min s | max s | median / safetensors | checkpoint MiB |",
             "|---|---|---:|---:|---:|---:|---:|", *rows, ""]
    atomic_write_text(RESULTS, "\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
