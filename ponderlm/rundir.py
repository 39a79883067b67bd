"""A run directory: the one place that knows its layout, creates and locks it, lists its checkpoints, reads its
config, checks data against its tokenizer, loads its model and says where reports about it go.

    RUN/
      .ponderlm-run      written first when a run starts, so that a start killed before config.yaml is still ours
      config.yaml        the resolved config the run trains with
      tokenizer.json     the tokenizer its data was prepared with (with Hugging Face's companion files, if any)
      metrics.jsonl      one line per logged step (train.py)
      sessions.jsonl     a "start" and an "end" line per training session: precision, machine, wall time
      checkpoints/       step_NNNNNNN/ folders (checkpoint.py writes and reads what is in them)
      analysis/, lm_eval_*.json, sweep_eval.json    reports about the run

`ponderlm.load(RUN)` is `RunDir(RUN).load()`: the model of the latest checkpoint and its tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import IO

import torch

from ponderlm.checkpoint import checkpoint_step, list_checkpoints, load_model_weights, save_checkpoint
from ponderlm.config import config_from_dict
from ponderlm.data import ModelTokenizer, TokenShards, copy_tokenizer_files, load_tokenizer, read_metadata
from ponderlm.data.shards import check_data_tokenizer
from ponderlm.data.tokenizer import COMPANION_FILES
from ponderlm.errors import PonderError
from ponderlm.files import LOCK_FILE, atomic_write_text, lock_directory, read_jsonl, sha256_file
from ponderlm.methods import Method, empty_model
from ponderlm.schema import Config, read_yaml_mapping


class RunDir:
    MARKER = ".ponderlm-run"
    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"  # Hugging Face's name: a Llama folder holds its tokenizer under it too
    METRICS = "metrics.jsonl"
    SESSIONS = "sessions.jsonl"
    CHECKPOINTS = "checkpoints"
    ANALYSIS = "analysis"
    # What --overwrite removes: the files of a run, and nothing a user put beside them.
    RUN_FILES = (CONFIG, TOKENIZER, *COMPANION_FILES, METRICS, SESSIONS, CHECKPOINTS)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / self.CONFIG
        self.tokenizer_file = self.path / self.TOKENIZER
        self.metrics_file = self.path / self.METRICS
        self.sessions_file = self.path / self.SESSIONS
        self.checkpoints_dir = self.path / self.CHECKPOINTS
        self._lock: IO | None = None

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- what it holds

    def holds_run(self) -> bool:
        return self.config_file.is_file()

    def read_config(self) -> Config:
        """The run's config, validated (an edited config.yaml gets a one-line error naming the file)."""
        if not self.holds_run():
            raise PonderError(f"{self} is not a run directory (no {self.CONFIG}); make one with `ponderlm train "
                              f"demo --out {self}` or `ponderlm import HF_DIR --out {self}`")
        data = read_yaml_mapping(self.config_file)
        if not data:
            raise PonderError(f"{self.config_file} is empty; restore the {self.CONFIG} the run was trained with")
        try:
            return config_from_dict(data).validate()
        except PonderError as exc:
            raise PonderError(f"{self.config_file}: {exc}; restore the file the run was trained with") from None

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.checkpoints_dir)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def require_checkpoint(self) -> Path:
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise PonderError(f"{self} has no checkpoint yet; train it first (`ponderlm train ... --out {self}`)")
        return checkpoint

    def finished(self, steps: int) -> bool:
        """Whether the run has a checkpoint at `steps` or later."""
        checkpoint = self.latest_checkpoint()
        return checkpoint is not None and checkpoint_step(checkpoint) >= steps

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], trainer_state: dict,
                        metadata: dict[str, str], keep_last: int) -> Path:
        return save_checkpoint(self.checkpoints_dir, step, weights, trainer_state, metadata, keep_last)

    def report_file(self, name: str) -> Path:
        """Where a report about the run (lm-eval results, a sweep's evaluations) is written."""
        return self.path / name

    # --- creation and lock

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Lock the directory until `release` (or the end of a `with` block), refusing a used one unless the user
        said --resume or --overwrite (which removes the run's files, and nothing else)."""
        if self.path.exists() and not self.path.is_dir():
            raise PonderError(f"{self} exists and is not a directory")
        if resume and not self.holds_run():
            raise PonderError(f"cannot resume: {self} holds no run (no {self.CONFIG}); drop --resume to start one")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = lock_directory(self.path, "run directory")
        if resume:
            return
        try:
            self._make_room(overwrite)
        except BaseException:
            self.release()
            raise
        (self.path / self.MARKER).touch()

    def _make_room(self, overwrite: bool) -> None:
        names = {path.name for path in self.path.iterdir()} - {LOCK_FILE}
        if self.MARKER in names and not names - {self.MARKER, self.TOKENIZER, *COMPANION_FILES, ".config.tmp.yaml"}:
            for name in names:  # a start killed before its config.yaml: ours, and nothing to keep
                (self.path / name).unlink()
            names = set()
        if not names - {self.MARKER}:
            return
        if not overwrite:
            raise PonderError(f"run directory {self} is not empty; pass --resume to continue it or --overwrite to "
                              "start over")
        if not self.holds_run():
            raise PonderError(f"refusing to --overwrite {self}: it is not empty and does not look like a run "
                              f"directory (no {self.CONFIG}); choose another --out")
        for name in self.RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for leftover in self.path.glob("events.out.tfevents.*"):
            leftover.unlink()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def create(self, config: Config, tokenizer_file: Path) -> None:
        """Write a new run's tokenizer and config (the config last: it is what makes the directory a run)."""
        copy_tokenizer_files(tokenizer_file, self.path)
        atomic_write_text(self.config_file, config.to_yaml())

    # --- training sessions

    def read_sessions(self) -> list[dict]:
        return read_jsonl(self.sessions_file) if self.sessions_file.is_file() else []

    def record_session(self, record: dict) -> None:
        with open(self.sessions_file, "a") as file:
            file.write(json.dumps(record) + "\n")

    def session_summary(self) -> dict:
        """What the run's training sessions ran with: precision, CPU, torch, threads (joined with "; " where
        sessions differ) and the wall time of the sessions that ended. Empty for a run from before runs recorded
        it."""
        lines = self.read_sessions()
        starts = [line for line in lines if line["event"] == "start"]
        if not starts:
            return {}

        def joined(key: str) -> str:
            return "; ".join(dict.fromkeys(str(line[key]) for line in starts))

        return {"precision": joined("precision"), "cpu": joined("cpu"), "cpu_capability": joined("cpu_capability"),
                "torch": joined("torch"), "threads": joined("threads"),
                "train_seconds": round(sum(line["seconds"] for line in lines if line["event"] == "end"), 1)}

    # --- data and model

    def check_data(self, data_dir: Path, metadata: dict, train_data: str | None = None) -> None:
        """Refuse data tokenised with another tokenizer than the run's own; with `train_data` (the fingerprint of
        the train shards), also refuse to resume on other training data than the run last trained on."""
        data_tokenizer = check_data_tokenizer(data_dir, metadata)
        if not self.tokenizer_file.is_file():
            raise PonderError(f"{self} has lost its {self.TOKENIZER}; copy back the one the run was trained with "
                              f"(for a run on unchanged data: {data_tokenizer})")
        if sha256_file(data_tokenizer) != sha256_file(self.tokenizer_file):
            raise PonderError(f"the data at {data_dir} was tokenised with another tokenizer than the run {self} "
                              f"(its {self.TOKENIZER}); use data prepared with the run's tokenizer")
        if train_data is None:
            return
        started_on = [s.get("train_data") for s in self.read_sessions() if s["event"] == "start"]
        if started_on and started_on[-1] not in (None, train_data):
            raise PonderError(f"the training data at {data_dir} changed since this run last trained (its train "
                              f"shards differ from the ones {self.SESSIONS} records): resume on that data, or start "
                              "a new run from this one with --init-from")

    def read_tokenizer(self, config: Config) -> ModelTokenizer:
        if not self.tokenizer_file.is_file():
            data_tokenizer = Path(config.data.path) / self.TOKENIZER
            raise PonderError(f"{self} has no {self.TOKENIZER}, which every run directory holds; copy back the one "
                              f"it was trained with (for a run on unchanged data: {data_tokenizer})")
        tokenizer = load_tokenizer(self.tokenizer_file)
        if tokenizer.get_vocab_size() > config.model.vocab_size:  # an imported model may have spare embedding rows
            raise PonderError(f"{self.tokenizer_file} has {tokenizer.get_vocab_size()} tokens but the model only "
                              f"{config.model.vocab_size}; restore the run's original {self.TOKENIZER}")
        return tokenizer

    def load(self, device: str | torch.device = "cpu") -> tuple[Method, ModelTokenizer]:
        """The model of the latest checkpoint, in eval mode on `device`, and the run's tokenizer."""
        config = self.read_config()
        checkpoint = self.require_checkpoint()
        tokenizer = self.read_tokenizer(config)
        # No random initialisation to overwrite (most of a large model's load time before:
        # benchmarks/results/load_time.md): the structure on the meta device, then memory, then the checkpoint,
        # which must fill every weight (load_model_weights refuses a missing one).
        model = empty_model(config, device)
        metadata = load_model_weights(model, checkpoint)
        expected = metadata.get("tokenizer_sha256")
        if expected and expected != sha256_file(self.tokenizer_file):
            raise PonderError(f"{self.tokenizer_file} is not the tokenizer {checkpoint.name} was trained with; "
                              f"restore the run's original {self.TOKENIZER}")
        return model.eval(), tokenizer  # empty_model allocated it on `device`

    def load_with_data(self, split: str, data_path: str | Path | None
                       ) -> tuple[Method, ModelTokenizer, TokenShards, dict]:
        """The model and tokenizer, and a split of data (data_path, default the run's data.path) checked to be
        tokenised with the run's tokenizer, with the data's metadata."""
        model, tokenizer = self.load()
        data_dir = Path(data_path or model.config.data.path)
        metadata = read_metadata(data_dir)
        self.check_data(data_dir, metadata)
        return model, tokenizer, TokenShards(data_dir, split), metadata


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Method, ModelTokenizer]:
    """`ponderlm.load(RUN_DIR)`: the model of a run's latest checkpoint and its tokenizer."""
    return RunDir(run_dir).load(device)

