"""Run directories and checkpoints.

A run directory holds `config.yaml`, `tokenizer.json`, `metrics.jsonl` and `checkpoints/step_NNNNNNN/` folders,
each with `model.safetensors`, `trainer_state.pt` and `checksums.json` (their sha256, checked whenever they are
read). A checkpoint is written into a hidden temporary folder and
renamed into place, so a kill at any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ponderlm.config import config_from_dict
from ponderlm.schema import Config, read_yaml_mapping
from ponderlm.data.shards import check_data_tokenizer
from ponderlm.data.tokenizer import COMPANION_FILES
from ponderlm.errors import PonderError, explain_os_error
from ponderlm.files import LOCK_FILE, lock_directory, save_safetensors, sha256_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7})$")
CHECKSUMS_FILE = "checksums.json"  # sha256 of each file of a checkpoint, written at save time
TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "iostream")  # how torch.save reports a failed write
RUN_MARKER = ".ponderlm-run"  # written first when a run starts, so that a start killed before config.yaml is ours
RUN_FILES = ("config.yaml", "tokenizer.json", *COMPANION_FILES, "metrics.jsonl", "sessions.jsonl", "checkpoints")


def lock_run_dir(run_dir: Path) -> IO:
    return lock_directory(run_dir, "run directory")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> IO:
    """Lock the run directory, refusing a used one unless the user said --resume or --overwrite; returns the lock."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PonderError(f"{run_dir} exists and is not a directory")
    if resume and not (run_dir / "config.yaml").is_file():
        raise PonderError(f"cannot resume: {run_dir} holds no run (no config.yaml); drop --resume to start one")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)
    if resume:
        return lock
    names = {path.name for path in run_dir.iterdir()} - {LOCK_FILE}
    if RUN_MARKER in names and not names - {RUN_MARKER, "tokenizer.json", *COMPANION_FILES, ".config.tmp.yaml"}:
        for name in names:  # a start killed before its config.yaml: ours, and nothing to keep
            (run_dir / name).unlink()
        names = set()
    used = bool(names - {RUN_MARKER})
    if used and not overwrite:
        lock.close()
        raise PonderError(
            f"run directory {run_dir} is not empty; pass --resume to continue it or --overwrite to start over"
        )
    if used:
        if not (run_dir / "config.yaml").is_file():
            lock.close()
            raise PonderError(f"refusing to --overwrite {run_dir}: it is not empty and does not look like a run "
                              "directory (no config.yaml); choose another --out")
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for leftover in run_dir.glob("events.out.tfevents.*"):
            leftover.unlink()
    (run_dir / RUN_MARKER).touch()
    return lock


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint folder (`step_NNNNNNN`) was saved at."""
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict,
                    metadata: dict[str, str], keep_last: int) -> Path:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state, stored = {}, set()
    for name, tensor in weights.items():
        tensor = tensor.detach().contiguous()
        if tensor.data_ptr() not in stored:  # a tied weight is stored once, under its first name
            state[name] = tensor
            stored.add(tensor.data_ptr())
    _require_finite(state, f"step {step}'s weights (not saved; the earlier checkpoints are kept)")
    try:
        save_safetensors(state, tmp / "model.safetensors", metadata={**metadata, "step": str(step)})
        torch.save(trainer_state, tmp / "trainer_state.pt")
        checksums = {name: sha256_file(tmp / name) for name in ("model.safetensors", "trainer_state.pt")}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1) + "\n")
        for name in (*checksums, CHECKSUMS_FILE):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as a RuntimeError of its own
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RuntimeError) and not any(mark in str(exc) for mark in TORCH_WRITE_ERRORS):
            raise
        reason = explain_os_error(exc) if isinstance(exc, OSError) else \
            f"{tmp}: writing failed ({_disk_state(folder)})"
        raise PonderError(f"cannot save the checkpoint of step {step} ({reason}); the earlier checkpoints are "
                          "kept: fix that and rerun with --resume") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def _disk_state(folder: Path) -> str:
    free = shutil.disk_usage(folder).free
    return f"{free / 2**20:.1f} MiB free on its disk" + ("; the disk is full" if free < 2**20 else "")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, or None."""
    # One pass, nothing allocated: a float64 sum of finite fp32/bf16 values cannot overflow, so it is finite exactly
    # when they all are (a float64 tensor's sum can overflow: a non-finite sum is checked element by element).
    return next((name for name, tensor in state.items() if tensor.is_floating_point()
                 and not torch.isfinite(tensor.sum(dtype=torch.float64)) and not torch.isfinite(tensor).all()), None)


def _require_finite(state: dict[str, torch.Tensor], what: str) -> None:
    if (bad := first_non_finite(state)) is not None:
        raise PonderError(f"{what} hold non-finite values (first: {bad}): the run diverged; lower train.lr and "
                          "train again, or use an earlier checkpoint")


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(checkpoint)[0]


def _verify_checksum(path: Path) -> None:
    """Compare a checkpoint file with the sha256 written when it was saved (checkpoints from before: unchecked)."""
    recorded = path.parent / CHECKSUMS_FILE
    if not recorded.is_file() or not path.is_file():
        return
    try:
        expected = json.loads(recorded.read_text()).get(path.name)
    except (OSError, ValueError, AttributeError):
        raise PonderError(f"{recorded} is damaged; move {path.parent.name} out of checkpoints/ to fall back to an "
                          "earlier checkpoint") from None
    if expected is not None and sha256_file(path) != expected:
        raise PonderError(f"{path} does not match the sha256 recorded when it was saved (corrupt); move "
                          f"{path.parent.name} out of checkpoints/ to fall back to an earlier checkpoint")


def _read_safetensors(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = checkpoint / "model.safetensors"
    _verify_checksum(path)
    try:
        state = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError) as exc:
        raise PonderError(f"cannot read checkpoint {path}: {exc}; move that folder out of checkpoints/ to fall "
                          "back to an earlier checkpoint") from None
    _require_finite(state, f"the weights in {path}")
    return state, metadata


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> dict[str, str]:
    """Load `model.safetensors` into the model; return the checkpoint's metadata."""
    path = checkpoint / "model.safetensors"
    state, metadata = _read_safetensors(checkpoint)
    missing, unexpected = model.load_state_dict(with_tied_weights(model, state), strict=False)
    if missing or unexpected:
        raise PonderError(f"checkpoint {path} does not fit the configured model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); check config.yaml in the run directory")
    return metadata


def with_tied_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` plus an entry for every parameter the model ties to another (stored once, under the first name)."""
    first: dict[int, str] = {}
    state = dict(state)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(parameter), name)
        if source != name and source in state:
            state.setdefault(name, state[source])
    return state


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / "trainer_state.pt"
    _verify_checksum(path)
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise PonderError(f"cannot read trainer state {path}: {exc}") from None


def require_run_tokenizer(run_dir: Path, data_dir: Path, data_metadata: dict) -> None:
    """Refuse data tokenised with another tokenizer than the run's own tokenizer.json."""
    data_tokenizer = check_data_tokenizer(data_dir, data_metadata)
    if not (run_dir / "tokenizer.json").is_file():
        raise PonderError(f"{run_dir} has lost its tokenizer.json; copy back the one the run was trained with "
                          f"(for a run on unchanged data: {data_tokenizer})")
    if sha256_file(data_tokenizer) != sha256_file(run_dir / "tokenizer.json"):
        raise PonderError(f"the data at {data_dir} was tokenised with another tokenizer than the run {run_dir} "
                          "(its tokenizer.json); use data prepared with the run's tokenizer")


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PonderError(f"{run_dir} is not a run directory (no config.yaml); make one with `ponderlm train demo "
                          f"--out {run_dir}` or `ponderlm import HF_DIR --out {run_dir}`")
    data = read_yaml_mapping(path)
    if not data:
        raise PonderError(f"{path} is empty; restore the config.yaml the run was trained with")
    try:
        return config_from_dict(data).validate()
    except PonderError as exc:
        raise PonderError(f"{path}: {exc}; restore the file the run was trained with") from None
