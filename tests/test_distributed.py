"""Two CPU processes with gloo: DDP and FSDP2 gradients equal one process's, and checkpoints change world size."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ponderlm import distributed
from ponderlm.config import load_config
from ponderlm.methods import build_model
from ponderlm.train import train

SETTINGS = ["ponder.extra_steps=2", "ponder.train_refine_passes=[2]"]  # for the methods that read them


def batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 61, (4, 16), generator=generator), torch.randint(0, 61, (4, 16), generator=generator)


def full_gradients(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    return grads


def _worker(rank, world_size, init_file, method, strategy, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        grads = _parallel_gradients(rank, method, strategy)
        if rank == 0:
            torch.save(grads, out_file)
    finally:
        # The DDP/FSDP objects are gone with _parallel_gradients' frame: a Reducer freed after the process group
        # is destroyed can deadlock gloo's worker thread on the GIL.
        dist.destroy_process_group()


def _parallel_gradients(rank, method, strategy):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"distributed.strategy={strategy}", "model.vocab_size=61"],
                         shared=SETTINGS)
    model = build_model(config)
    wrapped = distributed.parallelize(model, strategy, distributed.setup(strategy))
    inputs, targets = batch()
    share = slice(2 * rank, 2 * rank + 2)  # each rank takes its half of the global batch
    torch.manual_seed(1)
    loss, _ = wrapped(inputs[share], targets[share])
    loss.backward()
    return full_gradients(model)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_two_process_gradients_equal_one_process_gradients(method, strategy, tmp_path):
    context = mp.spawn(_worker, args=(2, tmp_path / "init", method, strategy, tmp_path / "grads.pt"), nprocs=2,
                       join=False)
    deadline = time.time() + 180  # never let a hung collective hang the suite
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish within 180 s")
    parallel = torch.load(tmp_path / "grads.pt")

    torch.manual_seed(0)
    model = build_model(load_config("tiny", [f"method={method}", "model.vocab_size=61"], shared=SETTINGS))
    inputs, targets = batch()
    torch.manual_seed(1)
    model.loss(inputs, targets)[0].backward()
    single = full_gradients(model)
    assert parallel.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-6, msg=name)


def read_losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if key in r}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_from_two_processes_resumes_on_one(strategy, tiny_data_dir, tmp_path):
    overrides = [f"data.path={tiny_data_dir}", "train.steps=4", "train.save_every=2", "train.log_every=1",
                 "train.keep_last=4", "train.micro_batch_size=2"]
    reference = tmp_path / "reference"
    train(load_config("tiny", overrides), reference, progress=False)

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ponderlm",
           "train", "tiny", "--out", str(run), "--set", f"distributed.strategy={strategy}",
           *[a for o in overrides for a in ("--set", o)]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    two = read_losses(run)
    for step in (1, 2, 3, 4):  # the same global batches, so the same losses up to reduction order
        assert two[step] == pytest.approx(read_losses(reference)[step], rel=1e-4)
    # validation calls `infer`, which FSDP2 gathers the sharded parameters for
    assert read_losses(run, "val_loss")[4] == pytest.approx(read_losses(reference, "val_loss")[4], rel=1e-4)

    shutil.rmtree(run / "checkpoints" / "step_0000004")  # continue from step 2, now on one process
    train(None, run, resume=True, progress=False)
    one = read_losses(run)
    for step in (3, 4):
        assert one[step] == pytest.approx(read_losses(reference)[step], rel=1e-4)
