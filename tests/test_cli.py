"""The command line as a user meets it: JSON outputs, and one-line errors (exit 2) for every bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ponderlm
from ponderlm.cli import main
from ponderlm.data import prepare
from ponderlm.generate import generate

FIXTURE_TEXTS = sorted((Path(__file__).parent / "fixtures" / "text").glob("*.txt"))


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "tiny", "--out", str(run), "--set", f"data.path={tiny_data_dir}"]) == 0
    return run


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ponderlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_eval_prints_the_design_json(trained_run, capsys):
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--split", "test")
    result = json.loads(out)
    assert code == 0
    assert {"loss", "ppl", "inference_flops_per_token", "mean_extra_steps", "method", "tokens"} <= result.keys()
    assert result["method"] == "vanilla" and result["mean_extra_steps"] == 0
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert "word_ppl" not in result  # only data with word counts (PTB) has word-level perplexity


def test_word_level_perplexity_when_the_data_counts_words(trained_run, tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    metadata = json.loads((data / "metadata.json").read_text())
    metadata["splits"]["val"]["words"] = 1000
    (data / "metadata.json").write_text(json.dumps(metadata))
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--data", str(data))
    result = json.loads(out)
    assert result["word_ppl"] == pytest.approx(math.exp(result["loss"] * result["tokens"] / 1000))


def test_load_returns_a_model_that_maps_ids_to_logits(trained_run):
    model, tokenizer = ponderlm.load(trained_run)
    ids = torch.tensor([tokenizer.encode("To be, or not to be").ids])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], tokenizer.get_vocab_size())


def test_greedy_generation_follows_the_full_forward_argmax(trained_run):
    model, tokenizer = ponderlm.load(trained_run)
    pieces = []
    text = generate(model, tokenizer, "The King", max_new_tokens=12, stop_at_eos=False, on_text=pieces.append)
    assert "".join(pieces) == text
    ids = tokenizer.encode("The King").ids
    for _ in range(12):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert tokenizer.decode(ids[-12:]) == text


def test_sampling_is_seeded(trained_run):
    model, tokenizer = ponderlm.load(trained_run)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, stop_at_eos=False)
    assert generate(model, tokenizer, "I", seed=1, **kwargs) == generate(model, tokenizer, "I", seed=1, **kwargs)


def test_generate_command_streams_the_continuation(trained_run, capsys):
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "The King", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("The King")


def test_unknown_config_key(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", "train.stpes=3")
    assert_one_line_error(code, err, "unknown config key 'train.stpes'", "steps")


def test_unknown_method(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", "method=ponder9")
    assert_one_line_error(code, err, "unknown method 'ponder9'", "vanilla")


def test_bad_config_value_type(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", "train.steps=many")
    assert_one_line_error(code, err, "train.steps")


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "nope.yaml", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "nope.yaml", "tiny")


def test_missing_data_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set",
                           f"data.path={tmp_path / 'nodata'}")
    assert_one_line_error(code, err, "nodata", "ponderlm data prepare")


def test_existing_run_directory(trained_run, capsys, tiny_data_dir):
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(trained_run), "--set", f"data.path={tiny_data_dir}")
    assert_one_line_error(code, err, "not empty", "--resume", "--overwrite")


def test_corrupt_shard_is_named(tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-3])
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", f"data.path={data}")
    assert_one_line_error(code, err, str(shard))


def test_data_with_another_tokenizer_is_refused_at_eval(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    prepare(other, source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path / "cache")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "eval", str(trained_run), "--data", str(other))
    assert_one_line_error(code, err, "tokenizer")


def test_replaced_tokenizer_in_the_run_is_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][::-1]
    (run / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, _, err = run_cli(capsys, "generate", str(run), "--prompt", "x")
    assert_one_line_error(code, err, "tokenizer")


def test_python_dash_m_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "ponderlm", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout
