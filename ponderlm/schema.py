"""The run configuration's schema: typed dataclasses, and the checks that need nothing but the values.

OmegaConf validates every key and type against these dataclasses, so a typo such as `train.stpes` is an error,
not a silently ignored value. This module knows no method and no torch: `ponderlm/config.py` builds a Config from
YAML and overrides and checks it against the method registry (which settings the chosen method reads).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ponderlm.errors import PonderError

PRESET_DIR = Path(__file__).resolve().parent / "configs"  # package data: a built wheel finds its presets


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the data's tokenizer
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 0  # grouped-query attention: heads of keys and values (0: num_attention_heads)
    intermediate_size: int = 0  # 0: LLaMA's 8/3 * hidden_size rounded up to a multiple of 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # How the ponderlm3 soft mask reaches attention: `sdpa` (augmented q.k through the fused causal kernel) or
    # `flex` (flex_attention with a score_mod bias; CUDA only, compiled). benchmarks/gpu_check.sh compares them.
    attention_backend: str = "sdpa"
    tie_word_embeddings: bool = False  # the lm-head reuses the token embedding matrix
    # The context a model was made for, beyond the windows this run trains on (an imported model's own, kept for
    # generation, lm-eval and export); 0: data.seq_len. See Config.context.
    max_position_embeddings: int = 0
    # Token embeddings times sqrt(2.5 d) (docs/design.md §2: ours, every method); models imported from Hugging Face
    # were trained without it.
    embedding_scale: bool = True

    def resolved_key_value_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 256) * 256


@dataclass
class DataConfig:
    path: str = "data/default"  # a directory written by `ponderlm data prepare`
    seq_len: int = 256


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_tokens: int = 16384  # tokens per optimizer step, all ranks and micro-batches together
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    lr: float = 1e-3
    # The method's own parts (router, gates: every parameter outside the backbone) train at lr x this; `--init-from`
    # raises it, so that parts new to a pretrained model learn faster than the model (docs/design.md 4.4).
    method_lr_scale: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the hardware computes it natively, else fp32)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 65536  # validation tokens per periodic evaluation
    save_every: int = 200
    keep_last: int = 2  # checkpoints kept on disk
    tensorboard: bool = False
    # torch.compile each block; its speed-up and the compile time the first steps pay are measured in
    # benchmarks/results/train_throughput*.md.
    compile: bool = True
    # Start from the weights of this run directory or Hugging Face Llama folder (fresh optimizer); the model shape
    # comes from it (`ponderlm train --init-from`). Every tensor whose name and shape fit is loaded.
    init_from: str = ""


@dataclass
class PonderConfig:
    """Extra compute per token: K for every method but vanilla; the rest is for the latent methods
    (docs/design.md §3, §4)."""

    extra_steps: int = 3  # K: pause slots, extra passes or recursions, or latent slots per token (max if adaptive)
    train_refine_passes: list[int] = field(default_factory=lambda: [2, 3])  # R is drawn from these in training
    eval_refine_passes: int = 3
    backprop_passes: int = 0  # backpropagate through only the last N Jacobi passes; 0 = all of them
    router_init_bias: float = 0.0  # added to the router's k = K logit at init (> 0 starts near ponderlm2)
    router_warmup_steps: int = 0  # ponderlm3 trains as ponderlm2 (s = one-hot K) for its first N steps
    router_fixed: list[float] = field(default_factory=list)  # ablation: this s (K + 1 values) for every token
    penalty: float = 0.0  # lambda: weight of the expected extra steps in the loss
    tau: float = 1e-4  # inference pruning: keep latent slot k while its tail mass w_k >= tau
    renormalize_pruned: bool = True  # divide the truncated mixture by its kept mass (false: the ablation)


def check_tau(tau: float | None, name: str = "--tau") -> None:
    """The pruning threshold: w_0 = 1 is always kept, so tau >= 1 would be meaningless; None = the run's."""
    if tau is not None and not 0.0 <= tau < 1.0:
        raise PonderError(f"{name} must lie in [0, 1), got {tau}")



@dataclass
class DistributedConfig:
    strategy: str = "none"  # none | ddp | fsdp


@dataclass
class Config:
    method: str = "vanilla"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ponder: PonderConfig = field(default_factory=PonderConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Options of single methods, by method name: `options.<method>.<key>`, typed by the method's own dataclass.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> int:
        """The longest sequence the model serves: its own context or the windows it trains on, the longer."""
        return max(self.model.max_position_embeddings, self.data.seq_len)

    def validate(self) -> Config:
        """The checks of values alone; `ponderlm.config.check_method` adds those that need the method registry."""
        m, t = self.model, self.train
        positive = {"model.hidden_size": m.hidden_size, "model.num_attention_heads": m.num_attention_heads,
                    "model.num_hidden_layers": m.num_hidden_layers, "train.steps": t.steps,
                    "train.batch_tokens": t.batch_tokens, "data.seq_len": self.data.seq_len,
                    "train.micro_batch_size": t.micro_batch_size, "train.log_every": t.log_every,
                    "train.eval_every": t.eval_every, "train.eval_tokens": t.eval_tokens,
                    "train.save_every": t.save_every, "train.keep_last": t.keep_last}
        for key, value in positive.items():
            if value <= 0:
                raise PonderError(f"{key} must be positive, got {value}")
        self._validate_optimizer()
        if m.hidden_size % m.num_attention_heads or (m.hidden_size // m.num_attention_heads) % 2:
            raise PonderError(
                f"model.hidden_size={m.hidden_size} must split into num_attention_heads={m.num_attention_heads} "
                "heads of even size (RoPE rotates pairs)"
            )
        if m.max_position_embeddings < 0:
            raise PonderError(f"model.max_position_embeddings must be >= 0 (0: data.seq_len), got "
                              f"{m.max_position_embeddings}")
        if m.num_key_value_heads < 0 or m.num_attention_heads % m.resolved_key_value_heads():
            raise PonderError(f"model.num_key_value_heads={m.num_key_value_heads} must divide "
                              f"num_attention_heads={m.num_attention_heads} (0: as many as the query heads)")
        if m.attention_backend not in ("sdpa", "flex"):
            raise PonderError(f"model.attention_backend must be sdpa or flex, not {m.attention_backend!r}")
        if t.dtype not in ("fp32", "bf16", "auto"):
            raise PonderError(f"train.dtype must be fp32, bf16 or auto, not {t.dtype!r}")
        if self.distributed.strategy not in ("none", "ddp", "fsdp"):
            raise PonderError(f"distributed.strategy must be none, ddp or fsdp, not {self.distributed.strategy!r}")
        p = self.ponder
        if p.extra_steps < 0 or p.eval_refine_passes < 0 or p.backprop_passes < 0 or p.router_warmup_steps < 0 \
                or not p.train_refine_passes or min(p.train_refine_passes) < 0:
            raise PonderError("ponder.extra_steps, the refine passes, backprop_passes and router_warmup_steps must be "
                              ">= 0, and ponder.train_refine_passes a non-empty list")
        check_tau(p.tau, "ponder.tau")
        if p.router_fixed and (len(p.router_fixed) != p.extra_steps + 1 or min(p.router_fixed) <= 0
                               or abs(sum(p.router_fixed) - 1) > 1e-6):
            raise PonderError(f"ponder.router_fixed must hold extra_steps + 1 = {p.extra_steps + 1} positive values "
                              f"summing to 1, got {list(p.router_fixed)}")
        if p.penalty < 0:
            raise PonderError(f"ponder.penalty must be >= 0, got {p.penalty}")
        return self

    def _validate_optimizer(self) -> None:
        t = self.train
        finite = {"train.lr": t.lr, "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
                  "train.min_lr_ratio": t.min_lr_ratio, "train.beta1": t.beta1, "train.beta2": t.beta2}
        for key, value in finite.items():
            if not math.isfinite(value):
                raise PonderError(f"{key} must be a finite number, got {value}")
        if t.lr <= 0 or t.grad_clip <= 0:
            raise PonderError(f"train.lr and train.grad_clip must be positive, got {t.lr} and {t.grad_clip}")
        if not 0 < t.method_lr_scale < math.inf:
            raise PonderError(f"train.method_lr_scale must be a positive number, got {t.method_lr_scale}")
        if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
            raise PonderError(f"train.beta1 and train.beta2 must be in [0, 1), got {t.beta1} and {t.beta2}")
        if t.weight_decay < 0 or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0:
            raise PonderError("train.weight_decay and train.warmup_steps must be >= 0 and train.min_lr_ratio in "
                              f"[0, 1], got {t.weight_decay}, {t.warmup_steps} and {t.min_lr_ratio}")

    def grad_accum_steps(self, world_size: int = 1) -> int:
        per_micro = self.train.micro_batch_size * self.data.seq_len * world_size
        if self.train.batch_tokens % per_micro:
            raise PonderError(
                f"train.batch_tokens={self.train.batch_tokens} is not a multiple of micro_batch_size x seq_len x "
                f"world_size = {self.train.micro_batch_size} x {self.data.seq_len} x {world_size} = {per_micro}"
            )
        return self.train.batch_tokens // per_micro

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a preset shipped in ponderlm/configs/ (`tiny`, `small`, `410m`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise PonderError(f"config {str(name_or_path)!r} is neither a file nor a preset ({', '.join(presets)})")


def read_yaml_mapping(path: Path) -> dict:
    """The YAML mapping in a config file, or one line saying why the file is not one."""
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise PonderError(f"config {path} is not a text file; give a YAML file or a preset name") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise PonderError(f"config {path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PonderError(f"config {path} must be a YAML mapping (keys such as method:, model:, train:), "
                          f"not a {type(data).__name__}")
    return data


def explain_error(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0]
    if "not in struct" in first_line or "Key '" in first_line and "not in" in first_line:
        parent = key.rsplit(".", 1)[0] if key and "." in key else None
        node = Config()
        for part in parent.split(".") if parent else []:
            node = getattr(node, part, None)
        known = ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else ""
        return f"unknown config key {key!r}" + (f"; known keys here: {known}" if known else "")
    return f"bad config value for {key!r}: {first_line}" if key else f"bad config: {first_line}"
