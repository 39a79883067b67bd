"""Runs record what they ran with: every training session's precision and machine, and how long it took."""

import json

import torch

from ponderlm.config import load_config
from ponderlm.evaluate import evaluate_run
from ponderlm.machine import machine, precision
from ponderlm.rundir import RunDir
from ponderlm.train import train


def test_each_training_session_records_its_precision_machine_and_time(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    config = load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=4", "train.save_every=2"])
    train(config, run, progress=False)
    (run / "checkpoints" / "step_0000004").rename(run / "gone")  # as if the first session had stopped at step 2
    train(config, run, resume=True, progress=False)
    lines = [json.loads(line) for line in RunDir(run).sessions_file.read_text().splitlines()]
    assert [(line["event"], line["step"]) for line in lines] == [("start", 0), ("end", 4), ("start", 2), ("end", 4)]
    here = machine()
    for start in lines[::2]:
        assert start["precision"] == precision(config) == "fp32" and start["world_size"] == 1
        assert {key: start[key] for key in here} == here
        assert start["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    summary = RunDir(run).session_summary()
    assert summary["precision"] == "fp32" and summary["cpu"] == here["cpu"]
    assert summary["threads"] == str(here["threads"])
    assert summary["train_seconds"] == round(lines[1]["seconds"] + lines[3]["seconds"], 1) > 0
    result = evaluate_run(run, max_tokens=64)
    assert result["precision"] == "fp32" and result["machine"] == here
    assert RunDir(tmp_path).session_summary() == {}  # a run from before runs recorded it
