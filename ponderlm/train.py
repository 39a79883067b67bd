"""The training loop: AdamW, warm-up + cosine, gradient accumulation, bf16 autocast, checkpoints, exact resume.
One process or many (torchrun); everything distributed goes through ponderlm/distributed.py.

Exact resume rests on three things: the batch of every step is a pure function of (seed, step)
(see batching.py); optimizer, scheduler and RNG states are checkpointed; and metrics.jsonl is cut back to the
checkpoint's step before training continues, so the file ends up as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ponderlm import distributed
from ponderlm.batching import WindowSampler
from ponderlm.checkpoint import load_trainer_state, read_model_weights, with_tied_weights
from ponderlm.data import TokenShards, load_tokenizer, read_metadata
from ponderlm.data.shards import check_data_tokenizer, train_data_fingerprint
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_model
from ponderlm.files import atomic_write_text, read_jsonl, sha256_file
from ponderlm.machine import autocast, machine, precision
from ponderlm.methods import build_model
from ponderlm.rundir import RunDir
from ponderlm.schema import Config
from ponderlm.sources import check_source_shape, check_source_tokenizer, load_initial_weights

# Keys a resumed run may change: they do not alter what is computed at a given step.
# The strategy too: checkpoints hold full state, so a run saved under torchrun resumes in one process and back.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
                     "train.tensorboard", "train.eval_tokens", "distributed.strategy"}


DIVERGING_NATS = 2.0  # a logged training loss this far above the lowest one so far is flagged in metrics.jsonl


def lr_at(step: int, config: Config) -> float:
    """Linear warm-up to lr, then cosine to min_lr_ratio * lr at the last step (step counts from 1)."""
    t = config.train
    if step <= t.warmup_steps:
        return t.lr * step / max(1, t.warmup_steps)
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms and biases); with `train.method_lr_scale` other than 1, the
    parameters outside the backbone (the method's own parts) form groups of their own at lr x that scale."""
    t = config.train
    named = list(model.named_parameters())
    if t.method_lr_scale == 1:  # two groups, as every checkpoint written before the scale existed has
        parts = [(1.0, [p for _, p in named])]
    else:
        parts = [(1.0, [p for n, p in named if not model.is_own_part(n)]),
                 (t.method_lr_scale, [p for n, p in named if model.is_own_part(n)])]
    groups = [{"params": [p for p in params if (p.dim() >= 2) == decays], "lr": t.lr * scale,
               "weight_decay": t.weight_decay if decays else 0.0}
              for scale, params in parts for decays in (True, False)]
    # The fused kernel: one pass over each parameter instead of a dozen elementwise ops (numerically equivalent up to
    # rounding). FSDP's sharded DTensor parameters keep the default implementation.
    fused = not any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


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

    def lowest_loss(self) -> float:
        """The lowest training loss logged so far (inf before the first record)."""
        if not self.path.exists():
            return math.inf
        return min((record.get("loss", math.inf) for record in read_jsonl(self.path)), default=math.inf)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()


def config_changes(saved: Config, requested: Config) -> str:
    """The keys (up to 4, shown old -> new) in which requested differs from saved beyond RESUMABLE_CHANGES; "" if
    none."""
    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    old, new = dict(flatten(saved.to_dict())), dict(flatten(requested.to_dict()))
    keys = [*old, *(k for k in new if k not in old)]  # a method option may be set on one side only
    changed = [k for k in keys if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES and k != "model.vocab_size"]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])


def _check_resumed_config(saved: Config, requested: Config) -> None:
    if shown := config_changes(saved, requested):
        raise PonderError(f"--resume with a different config ({shown}); resume without changing these, "
                          "or start a new run")


def _resolve_config(config: Config | None, run: RunDir, resume: bool, overwrite: bool) -> Config:
    if resume and overwrite:
        raise PonderError("pass either --resume or --overwrite, not both")
    if resume:
        saved = run.read_config()
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
    run = RunDir(run_dir)
    config = _resolve_config(config, run, resume, overwrite)
    topology = distributed.setup(config.distributed.strategy)
    try:
        with run:  # its lock, released however training ends
            return Trainer(config, run, resume, overwrite, topology).fit(progress)
    except BaseException as exc:
        # Free the DDP/FSDP objects the traceback holds before the process group goes: a gloo group destroyed
        # from a Reducer's destructor can deadlock on the GIL.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        distributed.teardown()


class Trainer:
    """One run on this rank: set-up and resume, then optimizer steps, evaluations and checkpoints."""

    def __init__(self, config: Config, run: RunDir, resume: bool, overwrite: bool, topology: distributed.Topology):
        self.config, self.run, self.topology = config, run, topology
        # Everything that can refuse the run comes before the first write, so a refused run leaves nothing behind.
        self.data_tokenizer = self._check_data(resume)
        self.train_shards = TokenShards(Path(config.data.path), "train")
        self.val_shards = TokenShards(Path(config.data.path), "val")
        t = config.train
        self.accum = config.grad_accum_steps(topology.world_size)
        self.sequences_per_step = t.batch_tokens // config.data.seq_len
        self.tokens_per_step = self.sequences_per_step * config.data.seq_len
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(config).to(topology.device)
        if t.init_from and not (resume and run.latest_checkpoint()):  # a run killed before its first checkpoint
            load_initial_weights(Path(t.init_from), self.model)           # starts from the source again
        if topology.is_main:
            run.claim(resume, overwrite)
            if not resume:
                run.create(config, self.data_tokenizer)
        distributed.barrier(topology)
        self.wrapped = distributed.parallelize(self.model, config.distributed.strategy, topology, t.compile)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s + 1, config) / t.lr)
        self.metrics = MetricsLog(run.metrics_file, run.path if t.tensorboard and topology.is_main else None)
        self.tokenizer_sha = sha256_file(run.tokenizer_file)
        self.sampler = WindowSampler(self.train_shards, config.data.seq_len, t.seed)
        self.start_step = self._resume() if resume else 0
        if topology.is_main:
            self.metrics.truncate(self.start_step)

    def _check_data(self, resume: bool) -> Path:
        """Check the data's metadata against the config (and, on --resume, the run's tokenizer); returns the data's
        tokenizer file."""
        config = self.config
        data_meta = read_metadata(Path(config.data.path))
        vocab_size = data_meta["tokenizer"]["vocab_size"]
        tokenizer_file = check_data_tokenizer(Path(config.data.path), data_meta)
        if config.train.init_from:  # first: another tokenizer is the cause of any size mismatch below
            check_source_tokenizer(Path(config.train.init_from), Path(config.data.path),
                                   data_meta["tokenizer"].get("sha256") or sha256_file(tokenizer_file))
        if 0 < config.model.vocab_size < vocab_size:  # more rows than tokens is fine (imported models pad)
            raise PonderError(f"model.vocab_size={config.model.vocab_size} but the tokenizer of {config.data.path} "
                              f"has {vocab_size} tokens; drop model.vocab_size to take it from the data")
        tokenizer_vocab = load_tokenizer(tokenizer_file).get_vocab_size()
        if tokenizer_vocab != vocab_size:
            raise PonderError(f"{tokenizer_file} has {tokenizer_vocab} tokens but "
                              f"the metadata.json beside it says {vocab_size}; re-run `ponderlm data prepare` "
                              "--overwrite for that directory")
        config.model.vocab_size = config.model.vocab_size or vocab_size
        if config.train.init_from:
            check_source_shape(config)
        self.train_data = train_data_fingerprint(data_meta)
        if resume:
            self.run.check_data(Path(config.data.path), data_meta, self.train_data)
        return tokenizer_file

    def _resume(self) -> int:
        """Load the latest checkpoint (if any); returns the step it was saved at."""
        checkpoint = self.run.latest_checkpoint()
        if checkpoint is None:
            return 0
        distributed.load_full_model_state(self.wrapped, with_tied_weights(self.model, read_model_weights(checkpoint)))
        state = load_trainer_state(checkpoint)
        if "optimizer" not in state:
            raise PonderError(f"{checkpoint} holds imported weights, not a training state; --resume continues "
                              "runs that `ponderlm train` started")
        distributed.load_full_optimizer_state(self.wrapped, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        return state["step"]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the step's global batch; the loss and statistics averaged over it."""
        t, topology = self.config.train, self.topology
        step_loss, stats_sum = 0.0, {}
        for micro in range(self.accum):
            # This rank's slice of the step's global batch: the same tokens train the step at any world size.
            micro_index = micro * topology.world_size + topology.rank
            first = (step - 1) * self.sequences_per_step + micro_index * t.micro_batch_size
            inputs, targets = (x.to(topology.device) for x in self.sampler.batch(first, t.micro_batch_size))
            with distributed.gradient_sync(self.wrapped, micro == self.accum - 1), \
                    autocast(self.config, topology.device.type):
                loss, stats = self.wrapped(inputs, targets, train_step=step)
            (loss / self.accum).backward()
            step_loss += loss.item() / self.accum
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / self.accum
        averaged = distributed.mean_over_ranks({"loss": step_loss, **stats_sum}, topology)
        if not math.isfinite(averaged["loss"]):
            raise PonderError(f"loss became {averaged['loss']} at step {step}; lower train.lr or use "
                              "train.dtype=fp32")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if not math.isfinite(grad_norm):  # a finite loss can still have inf/NaN gradients: never apply them
            raise PonderError(f"non-finite gradients at step {step} (norm {grad_norm}); nothing was applied and "
                              "the last checkpoint is intact; lower train.lr or use train.dtype=fp32")
        lr = self.optimizer.param_groups[0]["lr"]  # the backbone's (the first group's): train.lr's schedule
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": averaged.pop("loss"), "lr": lr, "grad_norm": grad_norm, **averaged}

    def evaluate(self) -> dict[str, float]:
        """Validation numbers for the log. Every rank evaluates (FSDP needs them all for its gathers)."""
        val = evaluate_model(self.model, self.val_shards, self.config.train.eval_tokens, scoring="jacobi")
        record = {"val_loss": val["loss"], "val_ppl": math.exp(min(val["loss"], 50.0))}
        if self.model.max_extra_steps:
            record["val_extra_steps"] = val["mean_extra_steps"]
        return record

    def save(self, step: int) -> None:
        weights = distributed.full_model_state(self.wrapped)  # collective under FSDP: every rank takes part
        state = {"step": step, "optimizer": distributed.full_optimizer_state(self.wrapped, self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "rng_torch": torch.get_rng_state()}
        if self.topology.is_main:
            self.run.save_checkpoint(step, weights, state,
                                     {"method": self.config.method, "tokenizer_sha256": self.tokenizer_sha},
                                     self.config.train.keep_last)
        distributed.barrier(self.topology)

    def fit(self, progress: bool | None) -> dict:
        """Train from the start (or resumed) step to train.steps; returns the last logged record."""
        t, main = self.config.train, self.topology.is_main
        self.model.train()
        record: dict = {}
        bar = tqdm(total=t.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=True if not main else None if progress is None else not progress)
        plain = main and progress is None and not sys.stderr.isatty()  # a log file gets lines, not a bar
        if plain:
            print(f"train: {self.run}, step {self.start_step} of {t.steps}", file=sys.stderr, flush=True)
        window_start, window_tokens = time.perf_counter(), 0
        session_start = time.perf_counter()
        if main:
            self.run.record_session({"event": "start", "step": self.start_step, "time": time.time(),
                                  "precision": precision(self.config, self.topology.device.type),
                                  "world_size": self.topology.world_size, "train_data": self.train_data,
                                  **machine(self.topology.device)})
        lowest = self.metrics.lowest_loss() if main else math.inf
        for step in range(self.start_step + 1, t.steps + 1):
            measured = self.train_step(step)
            window_tokens += self.tokens_per_step
            bar.update(1)
            evaluate_now = step % t.eval_every == 0 or step == t.steps
            if step % t.log_every == 0 or evaluate_now:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": measured.pop("loss"), "lr": measured.pop("lr"),
                          "tokens": step * self.tokens_per_step, "grad_norm": measured.pop("grad_norm"),
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9), **measured}
                if evaluate_now:
                    record.update(self.evaluate())
                if record["loss"] > lowest + DIVERGING_NATS:
                    record["loss_above_min"] = record["loss"] - lowest
                    if main:
                        tqdm.write(f"ponderlm: warning: step {step}: training loss {record['loss']:.3f} is "
                                   f"{record['loss_above_min']:.2f} nats above its minimum so far; the run may be "
                                   "diverging (lower train.lr)", file=sys.stderr)
                lowest = min(lowest, record["loss"])
                if main:
                    self.metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if plain:
                    print(f"train: step {step}/{t.steps}, loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                          f"{record['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
                window_start, window_tokens = time.perf_counter(), 0
            if step % t.save_every == 0 or step == t.steps:
                self.save(step)
        bar.close()
        if main:
            self.run.record_session({"event": "end", "step": t.steps, "seconds": time.perf_counter() - session_start})
        return record
