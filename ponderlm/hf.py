"""Hugging Face interop, the Llama format: a local Llama folder read onto our backbone (sources.py makes a run
directory or a run's starting point of it), and a run written as a folder `transformers` loads.

`ponderlm import HF_DIR --out RUN_DIR` maps a `LlamaForCausalLM` folder (config.json, model.safetensors or sharded
safetensors, tokenizer.json) onto our backbone: grouped-query attention, tied embeddings, rope_theta, rms_norm_eps
and the intermediate size carry over, the embedding scale is off, bf16 weights become fp32 master weights.
`ponderlm export RUN_DIR --out HF_DIR` writes a run of the backbone alone (`vanilla`) as a plain `LlamaForCausalLM`
folder with our embedding scale folded into the embedding matrix, and any other method with the modeling code in
`remote/`.

This module reads and writes files only (JSON and safetensors): `transformers` is needed by whoever loads an
exported folder and by the tests that compare logits on both sides, not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ponderlm.checkpoint import first_non_finite, read_model_weights
from ponderlm.schema import Config
from ponderlm.data import copy_tokenizer_files
from ponderlm.errors import PonderError
from ponderlm.files import atomic_write_text, directory_built_aside, save_safetensors
from ponderlm.methods import METHODS, model_skeleton
from ponderlm.rundir import RunDir

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


def llama_state(hf_dir: Path, config: Config) -> dict[str, torch.Tensor]:
    """The Llama's weights in hf_dir under our `backbone.*` names, checked to be finite."""
    try:
        state = backbone_state(read_llama_weights(hf_dir), config)
    except KeyError as exc:
        raise PonderError(f"{hf_dir} lacks the tensor {exc} of a {config.model.num_hidden_layers}-layer "
                          "Llama") from None
    except RuntimeError as exc:  # q/k/v or gate/up of sizes that do not concatenate
        raise PonderError(f"{hf_dir}: its tensors do not have the shapes its config.json describes "
                          f"({str(exc).splitlines()[0]})") from None
    if (bad := first_non_finite(state)) is not None:
        raise PonderError(f"{hf_dir} holds non-finite values (NaN or inf) in {bad}: the source model is damaged; "
                          "use an intact copy")
    return state


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
    run, out_dir = RunDir(run_dir), Path(out_dir)
    config = run.read_config()
    checkpoint = run.require_checkpoint()
    if out_dir.exists() and not out_dir.is_dir():
        raise PonderError(f"--out {out_dir} is a file; give a folder to export into")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PonderError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    run.read_tokenizer(config)
    METHODS[config.method].check_tau_applies(tau)
    with directory_built_aside(out_dir) as building:  # a failed export leaves no partial folder
        if METHODS[config.method].backbone_only:
            _export_llama(run, building, config, checkpoint)
        else:
            _export_remote_code(run, building, config, checkpoint, tau)
    return out_dir


def _export_remote_code(run: RunDir, out_dir: Path, config: Config, checkpoint: Path, tau: float | None) -> Path:
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
    _write_tokenizer_and_config(run, out_dir, config, config_json)
    return out_dir


def _write_tokenizer_and_config(run: RunDir, out_dir: Path, config: Config, config_json: dict) -> None:
    """config.json with the model's special token ids, and the run's tokenizer files as they came (the tokenizer's
    context set to the model's)."""
    tokenizer = run.read_tokenizer(config)
    stops = list(tokenizer.stop_ids)
    config_json = {**config_json, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                   "bos_token_id": tokenizer.bos_id, "pad_token_id": None}
    atomic_write_text(out_dir / "config.json", json.dumps(config_json, indent=2) + "\n")
    copy_tokenizer_files(run.tokenizer_file, out_dir)
    own = run.path / "tokenizer_config.json"
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "eos_token": tokenizer.token_text(tokenizer.document_id),
                        "clean_up_tokenization_spaces": False,
                        **(json.loads(own.read_text(encoding="utf-8")) if own.is_file() else {}),
                        "model_max_length": config.context}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")


def _export_llama(run: RunDir, out_dir: Path, config: Config, checkpoint: Path) -> Path:
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
    _write_tokenizer_and_config(run, out_dir, config, llama_config_json(config))
    return out_dir
