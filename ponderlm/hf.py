"""Hugging Face interop: a local Llama checkpoint becomes a run directory (or a run's starting point), and a run
a folder `transformers` loads.

`ponderlm import HF_DIR --out RUN_DIR` maps a `LlamaForCausalLM` folder (config.json, model.safetensors or sharded
safetensors, tokenizer.json) onto our backbone: grouped-query attention, tied embeddings, rope_theta, rms_norm_eps
and the intermediate size carry over, the embedding scale is off, bf16 weights become fp32 master weights. For a
latent method the backbone is the imported one and the method's own parts (router, gates, pause embedding) keep
their usual initialisation; `train --init-from` starts a new run from the same weights (or from a run directory).
`ponderlm export RUN_DIR --out HF_DIR` writes a `vanilla` run as a plain `LlamaForCausalLM` folder with our
embedding scale folded into the embedding matrix, and any other method with the modeling code in `remote/`.

This module reads and writes files only (JSON and safetensors): `transformers` is needed by whoever loads an
exported folder and by the tests that compare logits on both sides, not here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ponderlm.checkpoint import (first_non_finite, latest_checkpoint, prepare_run_dir, read_model_weights,
                                 read_run_config, save_checkpoint, with_tied_weights)
from ponderlm.config import Config, load_config
from ponderlm.data import copy_tokenizer_files
from ponderlm.errors import PonderError
from ponderlm.files import atomic_write_text, directory_built_aside, save_safetensors, sha256_file
from ponderlm.methods import METHODS, build_model, empty_model, model_skeleton
from ponderlm.methods.vanilla import Vanilla

REMOTE_CODE = Path(__file__).parent / "remote"  # modeling code an exported non-vanilla run ships with
# Per-layer weights that keep their name across the mapping (q/k/v and gate/up are fused on our side).
SAME_NAME_LAYER_WEIGHTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                           "post_attention_layernorm.weight")
# Our ModelConfig key <- the config.json key of a Hugging Face Llama.
LLAMA_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                     "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
                     "num_key_value_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
                     "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings"}


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise PonderError(f"RoPE scaling {kind!r} is not supported; only plain RoPE (rope_type default) imports")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_model_settings(hf_dir: Path) -> dict:
    """Our `model.*` settings for the Llama in hf_dir, or one line saying why it is not one we can import."""
    path = hf_dir / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PonderError(f"cannot read {path} ({exc}); give a Hugging Face model folder") from None
    if not isinstance(hf, dict):
        raise PonderError(f"{path} holds a JSON {type(hf).__name__}, not a model config (an object)")
    if hf.get("model_type") != "llama":
        raise PonderError(f"{path} describes model_type {hf.get('model_type')!r}; only llama imports")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise PonderError(f"{path}: only SiLU MLPs without biases import (hidden_act, attention_bias, mlp_bias)")
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    bad = [key for key in sizes if not isinstance(hf.get(key), int) or hf[key] <= 0]
    if bad:
        raise PonderError(f"{path}: {bad[0]} is {hf.get(bad[0])!r}; a Llama config needs a positive integer there")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise PonderError(f"{path}: head_dim {head_dim} x {hf['num_attention_heads']} heads != hidden_size")
    settings = {ours: hf[theirs] for ours, theirs in LLAMA_CONFIG_KEYS.items() if theirs in hf}
    context = hf.get("max_position_embeddings")
    if isinstance(context, int) and context > 1:
        settings["max_position_embeddings"] = context
    return {**settings, "rope_theta": _rope_theta(hf), "embedding_scale": False}


def read_llama_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    index = hf_dir / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PonderError(f"{index} is not a safetensors index (a weight_map of tensor -> file): {exc}") from None
    weights = {}
    for name in files:
        try:
            weights.update(load_file(hf_dir / name))
        except (OSError, SafetensorError) as exc:
            raise PonderError(f"cannot read {hf_dir / name} ({exc}); only safetensors weights import") from None
    return weights


def backbone_state(hf_weights: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors renamed (and q/k/v, gate/up fused) into our `backbone.*` names, in fp32."""
    w = {name.removeprefix("model."): tensor.float() for name, tensor in hf_weights.items()}
    state = {"backbone.embed_tokens.weight": w["embed_tokens.weight"], "backbone.norm.weight": w["norm.weight"]}
    if not config.model.tie_word_embeddings:
        state["backbone.lm_head.weight"] = w["lm_head.weight"]
    for i in range(config.model.num_hidden_layers):
        hf, ours = f"layers.{i}.", f"backbone.layers.{i}."
        state[ours + "self_attn.qkv_proj.weight"] = torch.cat(
            [w[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"])
        state[ours + "mlp.gate_up_proj.weight"] = torch.cat([w[hf + "mlp.gate_proj.weight"],
                                                             w[hf + "mlp.up_proj.weight"]])
        for name in SAME_NAME_LAYER_WEIGHTS:
            state[ours + name] = w[hf + name]
    return state


def _refuse_model_overrides(overrides: list[str], settings: dict, source: str) -> None:
    keys = [o.split("=", 1)[0] for o in overrides]
    conflicts = [k for k in keys if k.startswith("model.") and k.removeprefix("model.") in settings]
    if conflicts:
        raise PonderError(f"the model shape comes from {source}; drop --set {conflicts[0]}")


def import_llama(hf_dir: Path, run_dir: Path, method: str | None = None, overrides: list[str] | None = None,
                 overwrite: bool = False) -> Config:
    """Write a run directory (config, tokenizer, a step-0 checkpoint) holding the Llama in hf_dir."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    settings = llama_model_settings(hf_dir)
    _refuse_model_overrides(overrides or [], settings, str(hf_dir))
    # Evaluation windows of the model's whole context (as lm-eval's hf model uses); --set data.seq_len may shorten.
    own_windows = [f"data.seq_len={settings['max_position_embeddings']}"] if "max_position_embeddings" in settings \
        else []
    config = load_config(None, [f"method={method or Vanilla.name}", *(f"model.{k}={v}" for k, v in settings.items()),
                                *own_windows, *(overrides or [])])
    tokenizer = hf_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise PonderError(f"{hf_dir} has no tokenizer.json (the fast tokenizer file); save the model's tokenizer "
                          "there with save_pretrained")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise PonderError(f"{run_dir} is not empty; choose a new --out, or pass --overwrite to replace the run in it")
    # The folder fills the backbone: only a method with parts of its own (router, gates, ...) needs an initialised
    # model, the others skip the random initialisation (seconds at 135M).
    own_parts = any(not name.startswith("backbone.") for name, _ in model_skeleton(config).named_parameters())
    model = build_model(config) if own_parts else empty_model(config)
    load_initial_weights(hf_dir, model)
    created = not run_dir.exists()
    try:
        with prepare_run_dir(run_dir, resume=False, overwrite=overwrite):
            copy_tokenizer_files(tokenizer, run_dir)
            atomic_write_text(run_dir / "config.yaml", config.to_yaml())
            save_checkpoint(run_dir, 0, model.state_dict(), {"step": 0, "imported_from": str(hf_dir)},
                            {"method": config.method, "tokenizer_sha256": sha256_file(tokenizer)}, keep_last=1)
    except BaseException:
        if created:  # nothing of a failed import stays behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return config


def source_model_settings(source: Path) -> dict:
    """The `model.*` settings a run starting from `source` (a run directory or a Llama folder) must have: its shape
    and context."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        source_config = read_run_config(source)
        return {**dataclasses.asdict(source_config.model), "max_position_embeddings": source_config.context}
    if (source / "config.json").is_file():
        return llama_model_settings(source)
    raise PonderError(f"--init-from {source} is neither a run directory (config.yaml) nor a Hugging Face folder "
                      "(config.json)")


def init_from_config(base: str | Path | None, source: Path, overrides: list[str] | None = None) -> Config:
    """The config of a run that starts from `source` (`train --init-from`): `base` (a preset or YAML file) with the
    source's model shape and context, then the user's overrides (a conflicting `model.*` is an error); the training
    windows (data.seq_len) are the base's or the user's."""
    settings, overrides = source_model_settings(source), list(overrides or [])
    _refuse_model_overrides(overrides, settings, f"--init-from {source}")
    return load_config(base, [*(f"model.{k}={v}" for k, v in settings.items()), *overrides,
                              f"train.init_from={source}"])


def check_init_from_shape(config: Config) -> None:
    """A config built by hand with train.init_from must have the source's shape, as `init_from_config` gives it."""
    source = Path(config.train.init_from)
    for key, value in source_model_settings(source).items():
        if getattr(config.model, key) != value:
            raise PonderError(f"model.{key} is {getattr(config.model, key)!r} but train.init_from {source} has "
                              f"{value!r}; build the config with ponderlm.hf.init_from_config (as `train --init-from` "
                              "does), which takes the source's shape")


def load_initial_weights(source: Path, model: torch.nn.Module) -> None:
    """Load the tensors of `source` (a run directory's latest checkpoint, or a Llama folder's weights) that fit
    `model` by name and shape; the backbone must fit entirely. Where the method's own parts are not in the source,
    they are set so that the model computes what the source computes (`Method.start_as_source`)."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise PonderError(f"{source} has no checkpoint yet")
        state = read_model_weights(checkpoint)
    else:
        try:
            state = backbone_state(read_llama_weights(source), model.config)
        except KeyError as exc:
            raise PonderError(f"{source} lacks the tensor {exc} of a {model.config.model.num_hidden_layers}-layer "
                              "Llama") from None
        except RuntimeError as exc:  # q/k/v or gate/up of sizes that do not concatenate
            raise PonderError(f"{source}: its tensors do not have the shapes its config.json describes "
                              f"({str(exc).splitlines()[0]})") from None
        # (a run's checkpoint was scanned for NaN and inf as read_model_weights read it)
        if (bad := first_non_finite(state)) is not None:
            raise PonderError(f"{source} holds non-finite values (NaN or inf) in {bad}: the source model is "
                              "damaged; use an intact copy")
    own = model.state_dict()
    fitting = {name: tensor for name, tensor in state.items() if name in own and own[name].shape == tensor.shape}
    unfit = [name for name in own if name.startswith("backbone.") and name not in fitting
             and not (model.config.model.tie_word_embeddings and name == "backbone.lm_head.weight")]
    if unfit:
        raise PonderError(f"{source} does not hold {unfit[0]} in the shape its config describes")
    model.load_state_dict(with_tied_weights(model, fitting), strict=False)
    if all(name in fitting for name in own if not name.startswith("backbone.")):
        return  # the source had this method's parts too (a run of the same method): it continues as it was
    if not model.start_as_source():
        print(f"ponderlm: notice: a {model.config.method} model runs its extra steps on every token, so it cannot "
              f"start computing what {source} computes; its first steps relearn the output", file=sys.stderr)
    elif model.config.ponder.router_warmup_steps and model.prunable:
        print(f"ponderlm: notice: ponder.router_warmup_steps={model.config.ponder.router_warmup_steps} trains with "
              f"every extra step open at first, away from what {source} computes; 0 keeps it", file=sys.stderr)


def llama_config_json(config: Config) -> dict:
    m = config.model
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "intermediate_size": m.resolved_intermediate_size(),
            "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.resolved_key_value_heads(), "head_dim": m.hidden_size // m.num_attention_heads,
            "hidden_act": "silu", "rms_norm_eps": m.rms_norm_eps, "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "max_position_embeddings": config.context, "tie_word_embeddings": m.tie_word_embeddings,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", "dtype": "float32"}


def export_run(run_dir: Path, out_dir: Path, tau: float | None = None, overwrite: bool = False) -> Path:
    """Write the latest checkpoint of a run as a folder `transformers` loads: a vanilla run as a plain
    LlamaForCausalLM, any other method with its modeling code (trust_remote_code) running our inference at tau."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = read_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise PonderError(f"{run_dir} has no checkpoint yet; train it first")
    if out_dir.exists() and not out_dir.is_dir():
        raise PonderError(f"--out {out_dir} is a file; give a folder to export into")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PonderError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    if not (run_dir / "tokenizer.json").is_file():
        raise PonderError(f"{run_dir} has no tokenizer.json, which every run directory holds; copy the tokenizer.json "
                          "of the data it trained on (its data.path) into it")
    METHODS[config.method].check_tau_applies(tau)
    with directory_built_aside(out_dir) as building:  # a failed export leaves no partial folder
        if config.method == Vanilla.name:
            _export_llama(run_dir, building, config, checkpoint)
        else:
            _export_remote_code(run_dir, building, config, checkpoint, tau)
    return out_dir


def _export_remote_code(run_dir: Path, out_dir: Path, config: Config, checkpoint: Path, tau: float | None) -> Path:
    """The run's weights under `method.`, its whole config, and modeling code that builds the method from it."""
    from ponderlm.schema import check_tau

    check_tau(tau)
    model = model_skeleton(config)
    tau = model.resolve_tau(tau) if model.prunable else None
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {f"method.{name}": tensor.contiguous() for name, tensor in read_model_weights(checkpoint).items()}
    save_safetensors(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    for name in ("configuration_ponderlm.py", "modeling_ponderlm.py"):
        shutil.copyfile(REMOTE_CODE / name, out_dir / name)
    config_json = {"architectures": ["PonderLMForCausalLM"], "model_type": "ponderlm",
                   "auto_map": {"AutoConfig": "configuration_ponderlm.PonderLMConfig",
                                "AutoModelForCausalLM": "modeling_ponderlm.PonderLMForCausalLM"},
                   "ponderlm": config.to_dict(), "tau": tau, "vocab_size": config.model.vocab_size,
                   "max_position_embeddings": config.context}
    _write_tokenizer_and_config(run_dir, out_dir, config, config_json)
    return out_dir


def _write_tokenizer_and_config(run_dir: Path, out_dir: Path, config: Config, config_json: dict) -> None:
    """config.json with the model's special token ids, and the run's tokenizer files as they came (the tokenizer's
    context set to the model's)."""
    from ponderlm.data import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    stops = list(tokenizer.stop_ids)
    config_json = {**config_json, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                   "bos_token_id": tokenizer.bos_id, "pad_token_id": None}
    atomic_write_text(out_dir / "config.json", json.dumps(config_json, indent=2) + "\n")
    copy_tokenizer_files(run_dir / "tokenizer.json", out_dir)
    own = run_dir / "tokenizer_config.json"
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "eos_token": tokenizer.token_text(tokenizer.document_id),
                        "clean_up_tokenization_spaces": False,
                        **(json.loads(own.read_text(encoding="utf-8")) if own.is_file() else {}),
                        "model_max_length": config.context}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")


def _export_llama(run_dir: Path, out_dir: Path, config: Config, checkpoint: Path) -> Path:
    """A vanilla run as a plain LlamaForCausalLM: q/k/v and gate/up split, the embedding scale folded in."""
    m = config.model
    w = {name.removeprefix("backbone."): tensor for name, tensor in read_model_weights(checkpoint).items()}
    scale = model_skeleton(config).backbone.embed_scale
    if m.tie_word_embeddings and scale != 1.0:
        raise PonderError("a run with tied embeddings and the embedding scale cannot be a plain Llama")
    head_dim, kv = m.hidden_size // m.num_attention_heads, m.resolved_key_value_heads()
    state = {"model.embed_tokens.weight": w["embed_tokens.weight"] * scale, "model.norm.weight": w["norm.weight"]}
    if not m.tie_word_embeddings:
        state["lm_head.weight"] = w["lm_head.weight"]
    for i in range(m.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = w[ours + "self_attn.qkv_proj.weight"].split(
            (m.num_attention_heads * head_dim, kv * head_dim, kv * head_dim))
        gate, up = w[ours + "mlp.gate_up_proj.weight"].chunk(2)
        parts = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v, "mlp.gate_proj": gate,
                 "mlp.up_proj": up}
        state.update({f"{hf}{name}.weight": tensor for name, tensor in parts.items()})
        for name in SAME_NAME_LAYER_WEIGHTS:
            state[hf + name] = w[ours + name]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors",
                     metadata={"format": "pt"})
    _write_tokenizer_and_config(run_dir, out_dir, config, llama_config_json(config))
    return out_dir
