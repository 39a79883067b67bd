"""The one interface every method implements; the rest of the package uses methods only through it.

A method is a module on top of the shared backbone (`self.backbone`) that owns everything about itself: its
training objective, its parallel inference forward, its KV-cached decoding and cache, its analytic FLOPs, and an
inspection call for analysis tools. Callers never branch on a method's name; where methods differ in kind, they
read the capability flags below.

tau, the pruning threshold of adaptive methods, is an argument of every inference call (None: the run's
`ponder.tau`); methods that are not `prunable` ignore it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ponderlm.config import Config
from ponderlm.errors import PonderError
from ponderlm.flops import lm_head_flops
from ponderlm.model import KVCache, Transformer, linear_cross_entropy


@dataclasses.dataclass
class Inspection:
    """What a method computed for a batch (B, T), for analysis: the inference path at one tau.

    expected_extra_steps is the method's soft allocation (a router's expectation; the steps run, for methods
    without one). slot_states and step_distribution exist for methods whose output mixes per-slot states.
    """

    logits: torch.Tensor  # (B, T, V)
    extra_steps: torch.Tensor  # (B, T) long: the extra steps each token ran
    expected_extra_steps: torch.Tensor  # (B, T) float
    slot_states: torch.Tensor | None = None  # (B, T, K + 1, d): final-norm state of each slot, k = 0..K
    step_distribution: torch.Tensor | None = None  # (B, T, K + 1): the weight of each slot in the output


class Method(nn.Module, ABC):
    name: ClassVar[str]
    # Capability flags: what callers may ask of a method beyond the interface itself.
    latent_slots: ClassVar[bool] = False  # extra steps are extra slots of the sequence (not extra passes)
    prunable: ClassVar[bool] = False  # tau decides which extra steps run; a soft (training-mask) loss exists
    adaptive: ClassVar[bool] = False  # the extra steps vary per token (router statistics, `ponderlm analyze`)
    # A dataclass of this method's own config keys, set under `options.<name>.<key>`; None if it has none.
    Options: ClassVar[type | None] = None

    def __init__(self, config: Config, max_extra_steps: int | None = None):
        super().__init__()
        self.config = config
        self.options = method_options(config, type(self))
        self.max_extra_steps = config.ponder.extra_steps if max_extra_steps is None else max_extra_steps
        self.backbone = Transformer(config.model)

    # ----- training -----

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, train_step: int | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training objective and statistics worth logging.

        train_step: the optimizer step (from 1), for objectives that follow a schedule; None outside training.
        """
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), {}

    def lm_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the lm-head on `states` (B, T, d), without materialising the logits."""
        return linear_cross_entropy(states, self.backbone.lm_head.weight, targets)

    @abstractmethod
    def training_flops_per_token(self) -> float:
        """Forward + backward (3x forward) FLOPs per token of one training sequence of data.seq_len tokens."""

    # ----- inference in parallel -----

    @abstractmethod
    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) of the inference path and the extra steps each token ran (B, T)."""

    def forward(self, input_ids: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        return self.infer(input_ids, tau)[0]

    def inspect(self, input_ids: torch.Tensor, tau: float | None = None) -> Inspection:
        logits, extra_steps = self.infer(input_ids, tau)
        return Inspection(logits, extra_steps, extra_steps.float())

    def resolve_tau(self, tau: float | None) -> float:
        """The pruning threshold a call runs at."""
        return self.config.ponder.tau if tau is None else tau

    @classmethod
    def check_tau_applies(cls, tau: float | None) -> None:
        """Every command with --tau refuses it for a method that does not prune, rather than ignore it."""
        if tau is not None and not cls.prunable:
            raise PonderError(f"--tau applies to methods that prune their latent steps; {cls.name} runs do not "
                              "(drop --tau)")

    # ----- decoding with a KV cache -----

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype = torch.float32) -> KVCache:
        slots_per_token = 1 + (self.max_extra_steps if self.latent_slots else 0)
        passes = 1 if self.latent_slots else 1 + self.max_extra_steps
        return KVCache(self.config.model, batch_size, max_tokens * slots_per_token, dtype,
                       self.backbone.lm_head.weight.device, passes=passes)

    @abstractmethod
    def decode(self, input_ids: torch.Tensor, cache: KVCache, tau: float | None = None,
               extra_steps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Feed (B, n) tokens after the cached ones; return the logits (B, V) for the token after them.

        extra_steps, if given, receives the extra steps each fed token ran (one (B,) tensor per token).
        """

    # ----- FLOPs -----

    @abstractmethod
    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        """Total forward FLOPs to run windows (B, T) whose tokens ran `extra_steps` extra steps each."""

    def per_token_flops(self) -> float:
        """FLOPs spent per token outside the layer stack: the lm-head, unless a method adds more."""
        return lm_head_flops(self.config.model)

    def num_matmul_params(self) -> int:
        return self.backbone.num_matmul_params()


def method_options(config: Config, method: type[Method]):
    """The typed options of `method` from `config.options[method.name]` (its defaults where unset)."""
    if method.Options is None:
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(method.Options), config.options.get(method.name, {}))
    except OmegaConfBaseException as exc:
        known = ", ".join(f.name for f in dataclasses.fields(method.Options))
        raise PonderError(f"bad options.{method.name}: {str(exc).splitlines()[0]} (known keys: {known})") from None
    return OmegaConf.to_object(merged)
