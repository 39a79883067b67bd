"""The trainer: schedule, metrics, gradient accumulation, checkpoints and exact resume after SIGKILL."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ponderlm
from ponderlm.batching import WindowSampler
from ponderlm.rundir import RunDir
from ponderlm.config import load_config
from ponderlm.data import TokenShards
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_run
from ponderlm.files import sha256_file
from ponderlm.methods import build_model
from ponderlm.train import lr_at, train


def tiny(data_dir, *overrides):
    return load_config("tiny", [f"data.path={data_dir}", *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_warms_up_then_decays_to_ten_percent():
    config = load_config("tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0"])
    assert lr_at(1, config) == pytest.approx(0.1)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, config) == pytest.approx(0.1)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 100))


def test_training_logs_metrics_and_lowers_the_loss(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "train.steps=30"), run, progress=False)
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(2, 31, 2))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= records[0].keys()
    assert records[-1]["tokens"] == 30 * 256
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert "val_loss" in records[4] and math.isfinite(records[-1]["val_loss"])
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_0000020", "step_0000030"]  # keep_last = 2
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()


def test_gradient_accumulation_matches_one_big_batch(tiny_data_dir):
    grads = []
    for micro in (4, 2, 1):
        config = tiny(tiny_data_dir, f"train.micro_batch_size={micro}", "model.vocab_size=512")
        torch.manual_seed(0)
        model = build_model(config)
        sampler = WindowSampler(TokenShards(tiny_data_dir, "train"), 32, 0)
        accum = config.grad_accum_steps()
        for m in range(accum):
            loss, _ = model.loss(*sampler.batch(m * micro, micro))
            (loss / accum).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-6)


def test_resume_after_sigkill_reproduces_every_loss_bit_for_bit(tiny_data_dir, tmp_path):
    overrides = ["train.steps=60", "train.save_every=5", "train.log_every=1", "train.eval_every=20"]
    reference = tmp_path / "reference"
    train(tiny(tiny_data_dir, *overrides), reference, progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ponderlm", "train", "tiny", "--out", str(killed),
           "--set", f"data.path={tiny_data_dir}", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_0000010").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = int(RunDir(killed).checkpoints()[-1].name.split("_")[1])
    assert interrupted_at < 60

    train(None, killed, resume=True, progress=False)
    ours, theirs = read_metrics(killed), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert (a["loss"], a["lr"], a.get("val_loss")) == (b["loss"], b["lr"], b.get("val_loss")), a["step"]


def test_non_empty_run_dir_is_refused_without_resume_or_overwrite(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    config = tiny(tiny_data_dir, "train.steps=2")
    train(config, run, progress=False)
    with pytest.raises(PonderError, match="--resume .* --overwrite"):
        train(config, run, progress=False)
    train(config, run, overwrite=True, progress=False)
    assert [r["step"] for r in read_metrics(run)] == [2]


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_data_dir):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(PonderError, match="does not look like a run"):
        train(tiny(tiny_data_dir), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_start_killed_before_its_config_is_no_dead_end(tiny_data_dir, tmp_path):
    """Killed after the tokenizer was copied, before config.yaml: neither --resume (no run) nor --overwrite (not a
    run) could take it; it is our own stub, so a plain start goes ahead. A user's own tokenizer.json is not ours."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".ponderlm-run").touch()
    shutil.copyfile(tiny_data_dir / "tokenizer.json", run / "tokenizer.json")
    train(tiny(tiny_data_dir, "train.steps=1"), run, progress=False)
    assert (run / "config.yaml").is_file() and [r["step"] for r in read_metrics(run)] == [1]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("{}")
    with pytest.raises(PonderError, match="is not empty"):
        train(tiny(tiny_data_dir, "train.steps=1"), mine, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "tokenizer.json"]


def test_resume_refuses_a_changed_config(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "method=mor", "train.steps=2"), run, progress=False)
    with pytest.raises(PonderError, match="train.lr"):
        train(tiny(tiny_data_dir, "method=mor", "train.steps=2", "train.lr=0.5"), run, resume=True, progress=False)
    with pytest.raises(PonderError, match=r"options.mor.fixed_depth: None -> 1"):  # a key the saved run lacks
        train(tiny(tiny_data_dir, "method=mor", "train.steps=2", "options.mor.fixed_depth=1"), run, resume=True,
              progress=False)
    # Logging and checkpoint cadence do not change what is computed, so they may change on resume.
    train(tiny(tiny_data_dir, "method=mor", "train.steps=2", "train.log_every=1", "train.keep_last=1"), run,
          resume=True, progress=False)


def test_resume_of_a_finished_run_does_nothing_more(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "train.steps=4"), run, progress=False)
    before = (run / "metrics.jsonl").read_text()
    train(None, run, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_vocab_size_mismatch_with_the_data_is_refused(tiny_data_dir, tmp_path):
    with pytest.raises(PonderError, match="model.vocab_size=100 but the tokenizer"):
        train(tiny(tiny_data_dir, "model.vocab_size=100"), tmp_path / "run", progress=False)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_large_penalty_drives_extra_steps_down(tiny_data_dir, tmp_path):
    config = load_config("tiny", ["method=ponderlm3", f"data.path={tiny_data_dir}", "ponder.extra_steps=2",
                                  "ponder.penalty=2.0", "train.steps=16", "train.log_every=1", "train.lr=1e-2"])
    train(config, tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run")
    assert records[0]["expected_extra_steps"] == pytest.approx(1.0, abs=0.05)  # zero router: uniform over 0..2
    assert records[-1]["expected_extra_steps"] < 0.5
    assert {"router_entropy", "step_mass_0", "step_mass_2"} <= records[-1].keys()


def test_ponderlm3_resume_is_exact(tiny_data_dir, tmp_path):
    overrides = ["method=ponderlm3", f"data.path={tiny_data_dir}", "ponder.extra_steps=2", "ponder.penalty=0.01",
                 "train.steps=6", "train.log_every=1", "train.save_every=3", "train.keep_last=5"]
    run = tmp_path / "run"
    train(load_config("tiny", overrides), run, progress=False)
    full = without_timing(read_metrics(run))
    shutil.rmtree(RunDir(run).checkpoints()[-1])  # as if killed between step 3 and step 6
    train(None, run, resume=True, progress=False)
    assert without_timing(read_metrics(run)) == full


def test_non_finite_gradients_are_never_applied_nor_saved_and_the_good_checkpoint_stays(tiny_data_dir, tmp_path,
                                                                                        monkeypatch):
    """A step whose loss is finite but whose gradients are not (here injected at step 4, a save step) stops the
    run before the optimizer step: with keep_last=1 the step-2 checkpoint is still there and still loads."""
    import ponderlm.train as train_module

    backward_calls = []

    def build_with_a_bad_gradient(config):
        model = build_model(config)
        model.backbone.lm_head.weight.register_hook(
            lambda grad: grad * float("nan") if len(backward_calls.append(1) or backward_calls) == 4 else grad)
        return model

    monkeypatch.setattr(train_module, "build_model", build_with_a_bad_gradient)
    run = tmp_path / "run"
    with pytest.raises(PonderError, match="non-finite gradients at step 4"):
        train(tiny(tiny_data_dir, "train.steps=6", "train.save_every=2", "train.keep_last=1",
                   "train.batch_tokens=128"), run, progress=False)  # one backward per step
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_0000002"]
    model, _ = ponderlm.load(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_second_process_cannot_train_into_a_run_in_use_and_a_dead_ones_lock_never_blocks(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "train.steps=4", "train.save_every=2"), run, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    metrics = (run / "metrics.jsonl").read_text()
    held = RunDir(run)  # another training process, as far as the lock can tell
    held.claim(resume=True, overwrite=False)
    try:
        for resume, overwrite in ((True, False), (False, True)):
            with pytest.raises(PonderError, match=f"{run} is in use by another ponderlm process \\(pid {os.getpid()}"):
                train(None if resume else tiny(tiny_data_dir, "train.steps=4"), run, resume=resume,
                      overwrite=overwrite, progress=False)
        assert (run / "metrics.jsonl").read_text() == metrics and RunDir(run).checkpoints()
    finally:
        held.release()
    (run / ".lock").write_text("999999999\n")  # left behind by a killed process: no lock is held on it
    train(None, run, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run)][-1] == 4


def test_a_refused_run_leaves_no_directory_behind_and_the_corrected_command_then_runs(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(PonderError, match="not a multiple"):
        train(tiny(tiny_data_dir, "train.batch_tokens=100"), run, progress=False)
    assert not run.exists()
    train(tiny(tiny_data_dir, "train.steps=2"), run, progress=False)


def test_the_distributed_strategy_may_change_on_resume(tiny_data_dir, tmp_path):
    """Checkpoints hold full state, so a run saved under torchrun (ddp/fsdp) continues in one process."""
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "train.steps=4", "train.save_every=2", "distributed.strategy=ddp"), run,
          progress=False)
    expected = read_metrics(run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    train(tiny(tiny_data_dir, "train.steps=4", "train.save_every=2"), run, resume=True, progress=False)
    assert without_timing(read_metrics(run)) == without_timing(expected)


def test_a_training_loss_far_above_its_minimum_is_flagged(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(tiny_data_dir, "train.steps=12", "train.lr=3.0", "train.warmup_steps=1", "train.log_every=1",
               "train.grad_clip=1000"), run, progress=False)
    records = read_metrics(run)
    flagged = [r for r in records if "loss_above_min" in r]
    assert flagged, [r["loss"] for r in records]
    for record in flagged:
        lowest = min(r["loss"] for r in records if r["step"] < record["step"])
        assert record["loss_above_min"] == pytest.approx(record["loss"] - lowest) and record["loss_above_min"] > 2
    assert "nats above its minimum so far; the run may be diverging" in capsys.readouterr().err


def test_a_swapped_tokenizer_or_changed_training_data_is_refused(tiny_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    run = tmp_path / "run"
    train(tiny(data, "train.steps=2", "train.save_every=1"), run, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    # Another tokenizer of the same size in the data directory: only its sha256 tells.
    original = (data / "tokenizer.json").read_text()
    swapped = json.loads(original)
    vocab = swapped["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]  # two ids exchanged: the same size, other token ids
    (data / "tokenizer.json").write_text(json.dumps(swapped))
    with pytest.raises(PonderError, match=r"tokenizer.json is not the tokenizer .* were encoded with \(its sha256 differs"):
        train(None, run, resume=True, progress=False)
    with pytest.raises(PonderError, match=r"its sha256 differs"):
        evaluate_run(run, data_path=data)
    (data / "tokenizer.json").write_text(original)
    # The same tokenizer, other training text: the run would continue on other tokens without a word.
    meta = json.loads((data / "metadata.json").read_text())
    shard = data / meta["splits"]["train"]["shards"][0]["file"]
    tokens = np.fromfile(shard, dtype=meta["splits"]["train"]["dtype"])
    tokens[1:101] = tokens[101:201]
    tokens.tofile(shard)
    meta["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)
    (data / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PonderError, match="training data at .* changed since this run last trained"):
        train(None, run, resume=True, progress=False)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_the_methods_own_parts_train_at_their_scale_of_the_lr(scale):
    """`train.method_lr_scale`: the router's first Adam step is `scale` times the backbone's (Adam's first update is
    lr * sign(gradient)), every parameter is in exactly one group, and only matrices decay."""
    from ponderlm.methods import build_model
    from ponderlm.train import build_optimizer

    config = load_config("tiny", ["method=ponderlm3", "model.vocab_size=64", f"train.method_lr_scale={scale}"])
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for group in optimizer.param_groups
               for p in group["params"])
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # a pure Adam step below
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    router = [moved[n] for n in moved if not n.startswith("backbone.")]
    backbone = [moved[n] for n in moved if n.startswith("backbone.")]
    assert router and backbone
    assert max(backbone) == pytest.approx(config.train.lr, rel=1e-4)
    assert min(router) == max(router) == pytest.approx(config.train.lr * scale, rel=1e-4)


@pytest.mark.parametrize("scale", ["0", "-1", "inf", "nan"])
def test_a_method_lr_scale_that_is_not_a_positive_number_is_refused(scale):
    with pytest.raises(PonderError, match="train.method_lr_scale must be a positive number"):
        load_config("tiny", [f"train.method_lr_scale={scale}"])
