"""`make demo`: its preset trains and evaluates (shortened here), and its summary reads what the commands wrote."""

import json

from ponderlm.cli import main
from ponderlm.config import load_config
from ponderlm.demo import summary


def test_the_demo_preset_is_what_the_demo_promises():
    config = load_config("demo")
    assert config.method == "ponderlm3" and config.train.dtype == "fp32" and not config.train.compile
    assert config.model.hidden_size == 128 and config.ponder.extra_steps == 2


def test_a_shortened_demo_trains_evaluates_and_summarises(tiny_data_dir, tmp_path, capsys):
    runs = {"p3": tmp_path / "demo", "vanilla": tmp_path / "demo-vanilla"}
    short = ["--set", f"data.path={tiny_data_dir}", "--set", "train.steps=2", "--set", "train.save_every=2",
             "--set", "model.hidden_size=32", "--set", "data.seq_len=32", "--set", "train.batch_tokens=128",
             "--set", "train.micro_batch_size=4", "--set", "train.eval_tokens=64"]
    assert main(["train", "demo", "--out", str(runs["p3"]), *short]) == 0
    assert main(["train", "demo", "--out", str(runs["vanilla"]), *short, "--set", "method=vanilla"]) == 0
    for run in runs.values():
        capsys.readouterr()
        assert main(["eval", str(run), "--split", "test", "--max-tokens", "256"]) == 0
        (run / "eval_test.json").write_text(capsys.readouterr().out)
    assert main(["eval", str(runs["p3"]), "--split", "test", "--max-tokens", "256", "--taus", "0,0.3"]) == 0
    table = capsys.readouterr().out
    assert "tokens/s" in table and len([line for line in table.splitlines() if line.startswith("| 0")]) == 2
    assert main(["analyze", str(runs["p3"]), "--max-tokens", "128"]) == 0
    assert (runs["p3"] / "analysis" / "analysis.html").is_file()
    text = summary(runs["p3"], runs["vanilla"])
    ours, theirs = (json.loads((run / "eval_test.json").read_text()) for run in runs.values())
    assert f"PonderLM-3 {ours['ppl']:.1f}" in text and f"vanilla {theirs['ppl']:.1f}" in text
    assert "after training on 256 and 256 tokens" in text and "analysis.html" in text
