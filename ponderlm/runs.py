"""Loading a trained run: `ponderlm.load(RUN_DIR)` returns the model (latest checkpoint) and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ponderlm.checkpoint import latest_checkpoint, load_model_weights, read_run_config
from ponderlm.data import ModelTokenizer, load_tokenizer
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file
from ponderlm.methods import empty_model


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelTokenizer]:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise PonderError(f"{run_dir} has no checkpoint yet; train it first (`ponderlm train ... --out {run_dir}`)")
    tokenizer_path = run_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        data_tokenizer = Path(config.data.path) / "tokenizer.json"
        raise PonderError(f"{run_dir} has no tokenizer.json, which every run directory holds; copy back the one it "
                          f"was trained with (for a run on unchanged data: {data_tokenizer})")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > config.model.vocab_size:  # an imported model may have spare embedding rows
        raise PonderError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but the model only "
                          f"{config.model.vocab_size}; restore the run's original tokenizer.json")
    # No random initialisation to overwrite: the structure on the meta device, then memory, then the checkpoint,
    # which must fill every weight (load_model_weights refuses a missing one). Issue 34 measured the init at 12 of
    # the 15 s a 135M model took to load.
    model = empty_model(config, device)
    metadata = load_model_weights(model, checkpoint)
    expected = metadata.get("tokenizer_sha256")
    if expected and expected != sha256_file(tokenizer_path):
        raise PonderError(f"{tokenizer_path} is not the tokenizer {checkpoint.name} was trained with; "
                          "restore the run's original tokenizer.json")
    return model.eval(), tokenizer  # empty_model allocated it on `device`
