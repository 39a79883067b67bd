"""Checkpoints: the `step_NNNNNNN/` folders in a run's checkpoints/ (rundir.py owns the rest of a run directory),
each with `model.safetensors`, `trainer_state.pt` and `checksums.json` (their sha256, checked whenever they are
read). A checkpoint is written into a hidden temporary folder and renamed into place, so a kill at any moment leaves
either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ponderlm.errors import PonderError, explain_os_error
from ponderlm.files import save_safetensors, sha256_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7})$")
CHECKSUMS_FILE = "checksums.json"  # sha256 of each file of a checkpoint, written at save time
TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "iostream")  # how torch.save reports a failed write


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in `folder` (a run's checkpoints/), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint folder (`step_NNNNNNN`) was saved at."""
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict,
                    metadata: dict[str, str], keep_last: int) -> Path:
    """Write step's checkpoint into `folder` (a run's checkpoints/) and keep the last `keep_last`."""
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
    for old in list_checkpoints(folder)[:-keep_last]:
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
                          f"unexpected {unexpected[:3]}); check the config.yaml of its run directory")
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
