"""The command line as a user meets it: JSON outputs, and one-line errors (exit 2) for every bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ponderlm
from ponderlm.cli import main
from ponderlm.data import TokenShards, prepare

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


def test_load_returns_the_model_eval_scores(trained_run, tiny_data_dir, capsys):
    model, _ = ponderlm.load(trained_run)
    tokens = torch.from_numpy(TokenShards(tiny_data_dir, "val").read(0, 33).astype(np.int64))
    with torch.no_grad():
        nll = F.cross_entropy(model(tokens[None, :-1])[0], tokens[1:]).item()
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--max-tokens", "32")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
def test_generate_and_eval_of_a_latent_run_report_its_steps(method, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), "--set", f"method={method}", "--set", f"data.path={tiny_data_dir}",
                 "--set", "train.steps=2", "--set", "ponder.extra_steps=2"]) == 0
    capsys.readouterr()
    tau = ["--tau", "0"] if method == "ponderlm3" else []  # ponderlm2 does not prune: it always runs every slot
    assert main(["generate", str(run), "--prompt", "Four score", "--max-new-tokens", "4", "--show-steps", *tau]) == 0
    shown = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert 1 <= len(shown["extra_steps_per_generated_token"]) <= 4
    assert set(shown["extra_steps_per_generated_token"]) == {2}  # tau = 0 runs every slot

    assert main(["eval", str(run), "--max-tokens", "200", *tau]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mean_extra_steps"] == 2 and sum(result["extra_steps_histogram"]) == result["tokens"]
    if method == "ponderlm3":  # tau = 0 keeps every slot: the pruned forward is the soft forward
        assert result["pruned_minus_soft"] == pytest.approx(0, abs=1e-6)
        assert main(["eval", str(run), "--max-tokens", "200", "--taus", "0,0.999"]) == 0
        table = capsys.readouterr().out.strip().splitlines()
        soft = float(table[0].rsplit(" ", 1)[1])
        rows = [line.strip("|").split("|") for line in table[-2:]]
        assert float(rows[0][1]) == pytest.approx(soft, abs=0.01) and float(rows[0][2]) == 2.0
        assert float(rows[1][2]) < 2.0 and float(rows[1][3]) < float(rows[0][3])  # pruning saves FLOPs
    else:
        code, _, err = run_cli(capsys, "eval", str(run), "--taus", "0,0.5")
        assert_one_line_error(code, err, "--taus needs a run of a prunable method")


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "Four"], ["export", "--out", "EXPORT"]])
def test_tau_is_refused_for_a_method_that_does_not_prune(command, trained_run, tmp_path, capsys):
    argv = [command[0], str(trained_run), *[str(tmp_path / "hf") if a == "EXPORT" else a for a in command[1:]]]
    code, _, err = run_cli(capsys, *argv, "--tau", "0.1")
    assert_one_line_error(code, err, "--tau applies to methods that prune", "vanilla runs do not")
    assert not (tmp_path / "hf").exists()


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


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--bogus", "--out", "x"], "unrecognized arguments: --bogus"),
    (["eval"], "required: run_dir"),
    (["eval", "run", "--max-tokens", "0"], "--max-tokens: must be a positive integer, got 0"),
    (["analyze", "run", "--max-tokens", "-5"], "--max-tokens: must be a positive integer"),
    (["generate", "run", "--prompt", "x", "--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    (["generate", "run", "--prompt", "x", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "many"], "invalid positive_int value: 'many'"),
    (["lm-eval", "run", "--limit", "0"], "--limit: must be a positive integer"),
    (["lm-eval", "run", "--batch-size", "0"], "--batch-size: must be a positive integer"),
])
def test_usage_errors_are_one_line_too(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    _, err = capsys.readouterr()
    assert_one_line_error(exit_info.value.code, err, fragment, "--help")


@pytest.mark.parametrize("overrides, fragment", [
    (["model.num_attention_heads=0"], "model.num_attention_heads must be positive"),
    (["model.hidden_size=0"], "model.hidden_size must be positive"),
    (["train.lr=nan"], "train.lr must be a finite number"),
    (["train.lr=-0.1"], "train.lr and train.grad_clip must be positive"),
    (["train.beta2=1.0"], "train.beta1 and train.beta2 must be in [0, 1)"),
    (["train.eval_tokens=0"], "train.eval_tokens must be positive"),
])
def test_impossible_config_values_are_one_line_errors_and_write_nothing(overrides, fragment, tiny_data_dir, tmp_path,
                                                                        capsys):
    sets = [a for o in [f"data.path={tiny_data_dir}", *overrides] for a in ("--set", o)]
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), *sets)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"- a\n- b\n", "must be a YAML mapping"),
    (b"just words\n", "must be a YAML mapping"),
    (b"train: {steps: 3\n", "is not valid YAML"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(content, fragment, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", str(path), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, str(path), fragment)


def test_eval_of_zero_tokens_is_an_error_not_a_perfect_score(trained_run, tmp_path, capsys):
    from ponderlm.evaluate import evaluate_run
    from ponderlm.errors import PonderError

    with pytest.raises(PonderError, match="nothing to evaluate: max_tokens=0"):
        evaluate_run(trained_run, max_tokens=0)


def test_generate_refuses_more_new_tokens_than_the_context_and_cuts_a_long_prompt_on_the_left(trained_run, capsys):
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "x", "--max-new-tokens", "1000000")
    assert_one_line_error(code, err, "--max-new-tokens must be between 0 and 31", "context is 32 tokens")
    model, tokenizer = ponderlm.load(trained_run)
    prompt = " ".join(["the king"] * 40)
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", prompt, "--max-new-tokens", "8")
    assert code == 0 and out.startswith(prompt)
    assert f"the prompt has {len(tokenizer.encode(prompt).ids)} tokens; only its last 24 are used" in err
    from ponderlm.generate import generate

    cut = tokenizer.decode(tokenizer.encode(prompt).ids[-24:])
    assert out == prompt + generate(model, tokenizer, cut, max_new_tokens=8) + "\n"  # the CLI ends with a newline


def test_printed_json_is_standard_json(capsys):
    from ponderlm.cli import print_json

    print_json({"loss": float("nan"), "nested": {"ppl": float("inf")}, "values": [1.5, float("-inf")]})
    out = capsys.readouterr().out
    assert json.loads(out) == {"loss": None, "nested": {"ppl": None}, "values": [1.5, None]}
    assert "NaN" not in out and "Infinity" not in out


def test_resume_without_the_runs_tokenizer_names_the_file_to_restore(trained_run, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume")
    assert_one_line_error(code, err, "has lost its tokenizer.json", str(tiny_data_dir / "tokenizer.json"))


@pytest.mark.parametrize("damage, fragment", [
    (lambda meta: meta["splits"]["train"].update(dtype="float64"), "dtype 'float64', not one of uint16, uint32"),
    (lambda meta: meta["splits"]["val"]["shards"][0].pop("sha256"), "lacks 'sha256'"),
    (lambda meta: meta.pop("tokenizer"), "lacks 'tokenizer'"),
    (lambda meta: meta["tokenizer"].update(vocab_size=70000), "stores uint16 ids but the vocabulary has 70000"),
])
def test_damaged_data_metadata_is_one_line(damage, fragment, tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    meta = json.loads((data / "metadata.json").read_text())
    damage(meta)
    (data / "metadata.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", f"data.path={data}")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_metadata_that_disagrees_with_its_tokenizer_is_refused_before_training(tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    meta = json.loads((data / "metadata.json").read_text())
    meta["tokenizer"]["vocab_size"] = 600
    (data / "metadata.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", f"data.path={data}")
    assert_one_line_error(code, err, "has 512 tokens but the metadata.json beside it says 600")


def test_a_same_size_corrupt_shard_fails_its_sha256_and_is_named(tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    shard = sorted(data.glob("val_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[10:14] = bytes(4)  # same size, different tokens
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(capsys, "train", "tiny", "--out", str(tmp_path / "r"), "--set", f"data.path={data}")
    assert_one_line_error(code, err, str(shard), "sha256")


def test_every_command_says_what_it_does_and_shows_an_example(capsys):
    from ponderlm.cli import EXAMPLES, build_parser

    names = []
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        subcommands = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        names += [f"{name} {sub}" for sub in subcommands] or [name]
    assert sorted(names) == sorted(EXAMPLES)  # every command has an example, and every example a command
    for name in names:
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        shown = capsys.readouterr().out
        assert shown.split("\n\n")[1].strip()  # the one-line summary, after the usage
        assert f"example: {EXAMPLES[name]}" in shown and EXAMPLES[name].startswith(f"ponderlm {name}")


def test_resume_with_set_and_no_config_changes_the_runs_own_config(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), "--set", f"data.path={tiny_data_dir}", "--set",
                 "train.steps=2", "--set", "train.save_every=1"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--set", "train.steps=6")
    assert_one_line_error(code, err, "--resume with a different config (train.steps: 2 -> 6)")
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--set", "train.keep_last=1")
    assert code == 0 and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "none"), "--resume", "--set", "train.steps=1")
    assert_one_line_error(code, err, "holds no run (no config.yaml)")


@pytest.mark.parametrize("content,message", [
    ("", "is empty; restore the config.yaml"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("method: [unclosed\n", "is not valid YAML"),
    ("method: ponderlm9\n", "unknown method 'ponderlm9'"),
])
def test_a_damaged_run_config_is_one_line_for_every_command(trained_run, tmp_path, capsys, content, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text(content)
    for argv in (["eval", str(run)], ["train", "--out", str(run), "--resume"], ["generate", str(run), "--prompt", "a"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "config.yaml", message)
    with pytest.raises(ponderlm.errors.PonderError, match=message):
        ponderlm.load(run)


@pytest.mark.parametrize("flags,message", [
    (["--top-k", "-5"], "top_k -5: give 0"),
    (["--temperature", "1e-40"], "temperature 1e-40: give 0 (greedy) or a value of at least 0.001"),
    (["--max-new-tokens", "5000"], "--max-new-tokens must be between 0 and"),
])
def test_generate_checks_its_arguments_before_printing_anything(trained_run, capsys, flags, message):
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "Once upon", *flags)
    assert_one_line_error(code, err, message)
    assert out == ""


def test_a_prompt_that_is_not_utf8_is_one_line(trained_run, capsys):
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", undecodable)
    assert_one_line_error(code, err, "--prompt is not valid UTF-8 text")
    assert out == ""


def test_perplexity_does_not_overflow_on_a_huge_loss():
    from ponderlm.evaluate import perplexity

    assert perplexity(2.0) == pytest.approx(math.exp(2.0)) and perplexity(800.0) == math.inf


def test_a_run_without_its_tokenizer_names_the_run_file_not_data_prepare(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "generate", str(run), "--prompt", "a")
    assert_one_line_error(code, err, "has no tokenizer.json, which every run directory holds", "copy back")
    assert "data prepare" not in err


def test_two_data_sources_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "data", "prepare", "--source", "ptb", "--files", FIXTURE_TEXTS[0].as_posix(),
                           "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "--source ptb and --files are two sources")


def test_version_and_a_first_generate_on_a_tiny_run_with_the_defaults(trained_run, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"ponderlm {ponderlm.__version__}"
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "Once upon a time", "--show-steps")
    assert code == 0 and out.startswith("Once upon a time")
    assert len(json.loads(err.strip().splitlines()[-1])["extra_steps_per_generated_token"]) <= 16  # 32 // 2


def test_training_into_a_log_file_prints_plain_progress_lines(tiny_data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ponderlm", "train", "tiny", "--out", str(tmp_path / "run"),
                           "--set", f"data.path={tiny_data_dir}", "--set", "train.steps=4", "--set",
                           "train.log_every=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("train: ")]
    assert lines[0] == f"train: {tmp_path / 'run'}, step 0 of 4"
    assert [line.split(",")[0] for line in lines[1:]] == ["train: step 2/4", "train: step 4/4"]
    assert "tokens/s" in lines[-1] and "\r" not in done.stderr  # no progress bar


def test_every_argument_of_every_command_says_what_it_is():
    import argparse

    from ponderlm.cli import build_parser

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, f"{prefix}{name} ")
        yield prefix.strip(), parser

    silent = [f"{name}: {action.dest}" for name, parser in commands(build_parser()) for action in parser._actions
              if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
              and not action.help]
    assert silent == []
