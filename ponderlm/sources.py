"""Starting from a model trained elsewhere: `ponderlm import` makes a run directory of a Llama folder, and
`train --init-from SOURCE` starts a new run from a run directory's latest checkpoint or a Llama folder.

The source fixes the model's shape (a conflicting `--set model.*` is refused); the new run's method may differ, and
its own parts (router, gates) start so that the model computes what the source computes where the method allows it
(`Method.start_as_source`, docs/design.md §4.4). `init_from_config` is the library's `train --init-from`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import torch

from ponderlm.checkpoint import read_model_weights, with_tied_weights
from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file
from ponderlm.hf import llama_model_settings, llama_state
from ponderlm.methods import build_model, empty_model, model_skeleton
from ponderlm.rundir import RunDir
from ponderlm.schema import Config


def _refuse_model_overrides(overrides: list[str], settings: dict, source: str) -> None:
    keys = [o.split("=", 1)[0] for o in overrides]
    conflicts = [k for k in keys if k.startswith("model.") and k.removeprefix("model.") in settings]
    if conflicts:
        raise PonderError(f"the model shape comes from {source}; drop --set {conflicts[0]}")


def import_llama(hf_dir: Path, run_dir: Path, method: str | None = None, overrides: list[str] | None = None,
                 overwrite: bool = False) -> Config:
    """Write a run directory (config, tokenizer, a step-0 checkpoint) holding the Llama in hf_dir."""
    hf_dir, run = Path(hf_dir), RunDir(run_dir)
    settings = llama_model_settings(hf_dir)
    _refuse_model_overrides(overrides or [], settings, str(hf_dir))
    # Evaluation windows of the model's whole context (as lm-eval's hf model uses); --set data.seq_len may shorten.
    own_windows = [f"data.seq_len={settings['max_position_embeddings']}"] if "max_position_embeddings" in settings \
        else []
    config = load_config(None, [*([f"method={method}"] if method else []),
                                *(f"model.{k}={v}" for k, v in settings.items()), *own_windows, *(overrides or [])])
    tokenizer = hf_dir / RunDir.TOKENIZER
    if not tokenizer.is_file():
        raise PonderError(f"{hf_dir} has no {RunDir.TOKENIZER} (the fast tokenizer file); save the model's "
                          "tokenizer there with save_pretrained")
    if run.path.is_dir() and any(run.path.iterdir()) and not overwrite:
        raise PonderError(f"{run} is not empty; choose a new --out, or pass --overwrite to replace the run in it")
    # The folder fills the backbone: only a method with parts of its own (router, gates, ...) needs an initialised
    # model, the others skip the random initialisation (seconds at 135M).
    skeleton = model_skeleton(config)
    own_parts = any(skeleton.is_own_part(name) for name, _ in skeleton.named_parameters())
    model = build_model(config) if own_parts else empty_model(config)
    load_initial_weights(hf_dir, model)
    created = not run.path.exists()
    try:
        with run:
            run.claim(resume=False, overwrite=overwrite)
            run.create(config, tokenizer)
            run.save_checkpoint(0, model.state_dict(), {"step": 0, "imported_from": str(hf_dir)},
                                {"method": config.method, "tokenizer_sha256": sha256_file(tokenizer)}, keep_last=1)
    except BaseException:
        if created:  # nothing of a failed import stays behind
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    return config


def source_model_settings(source: Path) -> dict:
    """The `model.*` settings a run starting from `source` (a run directory or a Llama folder) must have: its shape
    and context."""
    source = Path(source)
    if RunDir(source).holds_run():
        source_config = RunDir(source).read_config()
        return {**dataclasses.asdict(source_config.model), "max_position_embeddings": source_config.context}
    if (source / "config.json").is_file():
        return llama_model_settings(source)
    raise PonderError(f"--init-from {source} is neither a run directory ({RunDir.CONFIG}) nor a Hugging Face folder "
                      "(config.json)")


# Continued pretraining wants a far smaller learning rate than training from scratch: a preset's lr makes the first
# steps forget what the source knows. The method's own parts, new to the model, start on a saddle (all mass on the
# source's path, `Method.start_as_source`) that they leave only at a rate that grows with their own lr: they train at
# the base's lr. Both measured by benchmarks/continued_pretraining.py (docs/results/continued-pretraining).
CONTINUED_LR_FRACTION = 0.1
CONTINUED_METHOD_LR_SCALE = 10.0


def init_from_config(base: str | Path | None, source: Path, overrides: list[str] | None = None) -> Config:
    """The config of a run that starts from `source` (`train --init-from`): `base` (a preset or YAML file) with the
    source's model shape and context, then the user's overrides (a conflicting `model.*` is an error); the training
    windows (data.seq_len) are the base's or the user's. Unless the overrides set them, `train.lr` is
    `CONTINUED_LR_FRACTION` of the base's and `train.method_lr_scale` is `CONTINUED_METHOD_LR_SCALE`."""
    settings, overrides = source_model_settings(source), list(overrides or [])
    _refuse_model_overrides(overrides, settings, f"--init-from {source}")
    shape = [f"model.{k}={v}" for k, v in settings.items()]
    given = {o.split("=", 1)[0].strip() for o in overrides}
    defaults = [] if "train.method_lr_scale" in given else [f"train.method_lr_scale={CONTINUED_METHOD_LR_SCALE:g}"]
    if "train.lr" not in given:
        base_lr = load_config(base, [*shape, *overrides]).train.lr
        defaults.append(f"train.lr={base_lr * CONTINUED_LR_FRACTION:.6g}")
    return load_config(base, [*shape, *defaults, *overrides, f"train.init_from={source}"])


def check_source_tokenizer(source: Path, data_dir: Path, data_sha: str) -> None:
    """A run starting from `source` trains on data tokenized with the source's tokenizer (`data_sha`: the sha256 the
    data's metadata records for its tokenizer)."""
    source_tokenizer = Path(source) / RunDir.TOKENIZER  # a run directory and a Llama folder both keep it there
    if not source_tokenizer.is_file() or sha256_file(source_tokenizer) != data_sha:
        raise PonderError(f"the data at {data_dir} was not tokenized with the tokenizer of --init-from {source}; "
                          f"prepare it with `ponderlm data prepare --tokenizer {source_tokenizer}`")


def check_source_shape(config: Config) -> None:
    """A config with train.init_from must have the source's shape, as `init_from_config` gives it."""
    source = Path(config.train.init_from)
    for key, value in source_model_settings(source).items():
        if getattr(config.model, key) != value:
            raise PonderError(f"model.{key} is {getattr(config.model, key)!r} but train.init_from {source} has "
                              f"{value!r}; build the config with ponderlm.sources.init_from_config (as `train "
                              "--init-from` does), which takes the source's shape")


def load_initial_weights(source: Path, model: torch.nn.Module) -> None:
    """Load the tensors of `source` (a run directory's latest checkpoint, or a Llama folder's weights) that fit
    `model` by name and shape; the backbone must fit entirely. Where the method's own parts are not in the source,
    they are set so that the model computes what the source computes (`Method.start_as_source`)."""
    source = Path(source)
    if RunDir(source).holds_run():
        state = read_model_weights(RunDir(source).require_checkpoint())
    else:
        state = llama_state(source, model.config)
    own = model.state_dict()
    fitting = {name: tensor for name, tensor in state.items() if name in own and own[name].shape == tensor.shape}
    unfit = [name for name in own if not model.is_own_part(name) and name not in fitting
             and not (model.config.model.tie_word_embeddings and name == "backbone.lm_head.weight")]
    if unfit:
        raise PonderError(f"{source} does not hold {unfit[0]} in the shape its config describes")
    model.load_state_dict(with_tied_weights(model, fitting), strict=False)
    if all(name in fitting for name in own if model.is_own_part(name)):
        return  # the source had this method's parts too (a run of the same method): it continues as it was
    if not model.start_as_source():
        print(f"ponderlm: notice: a {model.config.method} model runs its extra steps on every token, so it cannot "
              f"start computing what {source} computes; its first steps relearn the output", file=sys.stderr)
    elif model.config.ponder.router_warmup_steps and model.prunable:
        print(f"ponderlm: notice: ponder.router_warmup_steps={model.config.ponder.router_warmup_steps} trains with "
              f"every extra step open at first, away from what {source} computes; 0 keeps it", file=sys.stderr)
