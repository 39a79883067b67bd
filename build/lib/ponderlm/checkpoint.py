"""Run directories and checkpoints.

A run directory holds `config.yaml`, `tokenizer.json`, `metrics.jsonl` and `checkpoints/step_NNNNNNN/` folders,
each with `model.safetensors` and `trainer_state.pt`. A checkpoint is written into a hidden temporary folder and
renamed into place, so a kill at any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ponderlm.config import Config, config_from_dict
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7})$")
RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a used directory unless the user said --resume or --overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PonderError(f"{run_dir} exists and is not a directory")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise PonderError(f"cannot resume: {run_dir} holds no run (no config.yaml); drop --resume to start one")
        return
    if used and not overwrite:
        raise PonderError(
            f"run directory {run_dir} is not empty; pass --resume to continue it or --overwrite to start over"
        )
    if used:
        if not (run_dir / "config.yaml").is_file():
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
    run_dir.mkdir(parents=True, exist_ok=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


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
    state = {name: tensor.detach().contiguous() for name, tensor in weights.items()}
    save_file(state, tmp / "model.safetensors", metadata={**metadata, "step": str(step)})
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for name in ("model.safetensors", "trainer_state.pt"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(checkpoint)[0]


def _read_safetensors(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = checkpoint / "model.safetensors"
    try:
        state = load_file(path)
        with safe_open(path, "pt") as handle:
            return state, handle.metadata() or {}
    except (OSError, SafetensorError, ValueError) as exc:
        raise PonderError(f"cannot read checkpoint {path}: {exc}; delete that folder to fall back to an "
                          "earlier checkpoint") from None


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> dict[str, str]:
    """Load `model.safetensors` into the model; return the checkpoint's metadata."""
    path = checkpoint / "model.safetensors"
    state, metadata = _read_safetensors(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PonderError(f"checkpoint {path} does not fit the configured model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); check config.yaml in the run directory")
    return metadata


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise PonderError(f"cannot read trainer state {path}: {exc}") from None


def require_run_tokenizer(run_dir: Path, data_dir: Path, data_metadata: dict) -> None:
    """Refuse data tokenised with another tokenizer than the run's own tokenizer.json."""
    data_tokenizer = data_dir / data_metadata["tokenizer"]["file"]
    if sha256_file(data_tokenizer) != sha256_file(run_dir / "tokenizer.json"):
        raise PonderError(f"the data at {data_dir} was tokenised with another tokenizer than the run {run_dir} "
                          "(its tokenizer.json); use data prepared with the run's tokenizer")


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PonderError(f"{run_dir} is not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))
