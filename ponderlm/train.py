"""The training loop: AdamW, warm-up + cosine, gradient accumulation, bf16 autocast, checkpoints, exact resume.
One process or many (torchrun); everything distributed goes through ponderlm/distributed.py.

Exact resume rests on three things: the batch of every step is a pure function of (seed, step)
(see batching.py); optimizer, scheduler and RNG states are checkpointed; and metrics.jsonl is cut back to the
checkpoint's step before training continues, so the file ends up as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from ponderlm import distributed
from ponderlm.batching import WindowSampler
from ponderlm.checkpoint import (latest_checkpoint, load_trainer_state, prepare_run_dir, read_model_weights,
                                 read_run_config, require_run_tokenizer, save_checkpoint)
from ponderlm.config import Config
from ponderlm.data import TokenShards, read_metadata
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_model
from ponderlm.files import atomic_write_text, sha256_file
from ponderlm.methods import build_model

# Keys a resumed run may change: they do not alter what is computed at a given step.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
                     "train.tensorboard", "train.eval_tokens"}


def lr_at(step: int, config: Config) -> float:
    """Linear warm-up to lr, then cosine to min_lr_ratio * lr at the last step (step counts from 1)."""
    t = config.train
    if step <= t.warmup_steps:
        return t.lr * step / max(1, t.warmup_steps)
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(config.train.beta1, config.train.beta2))


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written; `truncate` drops lines after a step."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PonderError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install -e '.[tensorboard]'") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def truncate(self, last_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()


def _check_resumed_config(saved: Config, requested: Config) -> None:
    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    old, new = dict(flatten(saved.to_dict())), dict(flatten(requested.to_dict()))
    changed = [k for k in old if old[k] != new.get(k) and k not in RESUMABLE_CHANGES and k != "model.vocab_size"]
    if changed:
        shown = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:4])
        raise PonderError(f"--resume with a different config ({shown}); resume without changing these, "
                          "or start a new run")


def _resolve_config(config: Config | None, run_dir: Path, resume: bool, overwrite: bool) -> Config:
    if resume and overwrite:
        raise PonderError("pass either --resume or --overwrite, not both")
    if resume:
        saved = read_run_config(run_dir)
        if config is None:
            return saved
        _check_resumed_config(saved, config)  # only RESUMABLE_CHANGES may differ: run the requested config
        config.model.vocab_size = saved.model.vocab_size
    elif config is None:
        raise PonderError("a config is required to start a new run")
    return config


def train(config: Config | None, run_dir: Path, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict:
    """Train (or continue) a run; returns the last logged record. Under torchrun, every rank calls this."""
    run_dir = Path(run_dir)
    config = _resolve_config(config, run_dir, resume, overwrite)
    topology = distributed.setup(config.distributed.strategy)
    try:
        return _train(config, run_dir, resume, overwrite, progress, topology)
    except BaseException as exc:
        # Free the DDP/FSDP objects the traceback holds before the process group goes: a gloo group destroyed
        # from a Reducer's destructor can deadlock on the GIL.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        distributed.teardown()


def _train(config: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool | None,
           topology: distributed.Topology) -> dict:
    main = topology.is_main
    data_meta = read_metadata(Path(config.data.path))
    data_tokenizer = Path(config.data.path) / data_meta["tokenizer"]["file"]
    vocab_size = data_meta["tokenizer"]["vocab_size"]
    if config.model.vocab_size not in (0, vocab_size):
        raise PonderError(f"model.vocab_size={config.model.vocab_size} but the tokenizer of {config.data.path} "
                          f"has {vocab_size} tokens; drop model.vocab_size to take it from the data")
    config.model.vocab_size = vocab_size
    if resume:
        require_run_tokenizer(run_dir, Path(config.data.path), data_meta)
    if main:
        prepare_run_dir(run_dir, resume, overwrite)
        if not resume:
            shutil.copyfile(data_tokenizer, run_dir / "tokenizer.json")
            atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    distributed.barrier(topology)
    train_shards = TokenShards(Path(config.data.path), "train")
    val_shards = TokenShards(Path(config.data.path), "val")

    t = config.train
    accum = config.grad_accum_steps(topology.world_size)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(config).to(topology.device)
    if t.compile:  # per block, as torchtitan does: small graphs, one compile reused by every layer
        for block in model.backbone.layers:
            block.compile()
    wrapped = distributed.wrap(model, config.distributed.strategy, topology)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s + 1, config) / t.lr)
    metrics = MetricsLog(run_dir / "metrics.jsonl", run_dir if t.tensorboard and main else None)
    tokenizer_sha = sha256_file(run_dir / "tokenizer.json")

    start_step = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        distributed.load_full_model_state(wrapped, read_model_weights(checkpoint))
        state = load_trainer_state(checkpoint)
        distributed.load_full_optimizer_state(wrapped, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        start_step = state["step"]
    if main:
        metrics.truncate(start_step)

    sampler = WindowSampler(train_shards, config.data.seq_len, t.seed)
    sequences_per_step = t.batch_tokens // config.data.seq_len
    tokens_per_step = sequences_per_step * config.data.seq_len
    model.train()
    record: dict = {}
    bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=True if not main else None if progress is None else not progress)
    window_start, window_tokens = time.perf_counter(), 0

    def checkpoint_now(step: int) -> None:
        weights = distributed.full_model_state(wrapped)  # collective under FSDP: every rank takes part
        state = {"step": step, "optimizer": distributed.full_optimizer_state(wrapped, optimizer),
                 "scheduler": scheduler.state_dict(), "rng_torch": torch.get_rng_state(),
                 "samples_seen": step * sequences_per_step}
        if main:
            save_checkpoint(run_dir, step, weights, state,
                            {"method": config.method, "tokenizer_sha256": tokenizer_sha}, t.keep_last)
        distributed.barrier(topology)

    for step in range(start_step + 1, t.steps + 1):
        step_loss = 0.0
        stats_sum: dict[str, float] = {}
        for micro in range(accum):
            # This rank's slice of the step's global batch: the same tokens train the step at any world size.
            slot = micro * topology.world_size + topology.rank
            first = (step - 1) * sequences_per_step + slot * t.micro_batch_size
            inputs, targets = (x.to(topology.device) for x in sampler.batch(first, t.micro_batch_size))
            with distributed.gradient_sync(wrapped, micro == accum - 1), config.autocast(topology.device.type):
                loss, stats = wrapped("loss", inputs, targets, step=step)
            (loss / accum).backward()
            step_loss += loss.item() / accum
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / accum
        averaged = distributed.mean_over_ranks({"loss": step_loss, **stats_sum}, topology)
        step_loss, stats_sum = averaged.pop("loss"), averaged
        if not math.isfinite(step_loss):
            raise PonderError(f"loss became {step_loss} at step {step}; lower train.lr or use train.dtype=fp32")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        bar.update(1)

        evaluate_now = step % t.eval_every == 0 or step == t.steps
        if step % t.log_every == 0 or evaluate_now:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": step_loss, "lr": lr, "tokens": step * tokens_per_step,
                      "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(elapsed, 1e-9), **stats_sum}
            if evaluate_now:  # every rank evaluates (FSDP needs them all for its gathers); rank 0 logs
                val = evaluate_model(model, config, val_shards, t.eval_tokens, runner=wrapped)
                record.update(val_loss=val["loss"], val_ppl=math.exp(min(val["loss"], 50.0)))
                if config.method != "vanilla":
                    record["val_extra_steps"] = val["mean_extra_steps"]
            if main:
                metrics.write(record)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if step % t.save_every == 0 or step == t.steps:
            checkpoint_now(step)
    bar.close()
    return record
