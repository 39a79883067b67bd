"""The one interface every method implements; the rest of the package uses methods only through it.

A method is a module on top of the shared backbone (`self.backbone`) that owns everything about itself: its training
objective, its parallel inference forward, its per-row decoding state for the engine (`ponderlm/engine.py`), its
analytic FLOPs, and an inspection call for analysis tools. Callers never branch on a method's name; where methods
differ in kind, they read the capability flags below.

tau, the pruning threshold of adaptive methods, is an argument of every inference call (None: the run's `ponder.tau`);
methods that are not `prunable` ignore it. Each method declares the `ponder.*` settings it reads (`settings`) and its
own options (`Options`, under `options.<name>`).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ponderlm.schema import Config
from ponderlm.errors import PonderError
from ponderlm.flops import lm_head_flops
from ponderlm.model import Transformer, linear_cross_entropy


# The router logit margin of a converted model (`start_as_source`): each alternative to the source's own path gets
# at most e^-12 of the mass, which moves a loss by about 1e-5 nats; Adam's first steps move it regardless of the
# small gradient (tests/methods/test_conversion.py).
SOURCE_MARGIN = 12.0


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
    backbone_only: ClassVar[bool] = False  # computes what the backbone computes alone: exports as a plain Llama
    # The `ponder.*` settings this method reads; ponderlm/config.py refuses the others when given for a run
    # (tests/methods/test_interface.py checks that no other setting changes what a method computes).
    settings: ClassVar[tuple[str, ...]] = ()
    # A dataclass of this method's own config keys, set under `options.<name>.<key>`; None if it has none.
    Options: ClassVar[type | None] = None

    def __init__(self, config: Config, max_extra_steps: int | None = None):
        super().__init__()
        if type(self).infer is Method.infer and type(self).inspect is Method.inspect:
            raise TypeError(f"{type(self).__name__} implements neither infer nor inspect")
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
        logits = self.infer(input_ids)[0]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), {}

    def lm_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the lm-head on `states` (B, T, d), without materialising the logits."""
        return linear_cross_entropy(states, self.backbone.lm_head.weight, targets)

    @abstractmethod
    def training_flops_per_token(self) -> float:
        """Forward + backward (3x forward) FLOPs per token of one training sequence of data.seq_len tokens."""

    def backprop_flops_per_token(self, stack_forward: float) -> float:
        """3x the forward FLOPs per token of a training sequence whose layer stack costs `stack_forward` (its
        lm-head added), for methods that backpropagate through every pass."""
        T = self.config.data.seq_len
        return 3 * (stack_forward + T * self.per_token_flops()) / T

    # ----- inference in parallel -----

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) of the inference path and the extra steps each token ran (B, T). A method implements
        `infer`, or `inspect` where it computes the soft allocation anyway."""
        seen = self.inspect(input_ids, tau)
        return seen.logits, seen.extra_steps

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, train_step: int | None = None):
        """With targets, the training objective and its statistics (`loss`): training calls the module, so that DDP
        and FSDP hook in as they do for any model. Without, the logits of the inference path at the run's tau."""
        if targets is None:
            return self.infer(input_ids)[0]
        return self.loss(input_ids, targets, train_step)

    def inspect(self, input_ids: torch.Tensor, tau: float | None = None) -> Inspection:
        """`infer` with the expected extra steps of each token (those it ran, unless the method routes softly)."""
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

    # ----- decoding, through the inference engine (ponderlm/engine.py) -----

    # The prompt's slots can run in parallel exactly (no slot's input depends on an earlier slot's output):
    # the engine then fills a new row's cache with `prefill` instead of feeding the prompt slot by slot.
    parallel_prefill: ClassVar[bool] = False
    # The parallel `infer` equals sequential decoding exactly; False where it is a Jacobi approximation.
    exact_parallel: ClassVar[bool] = True

    @property
    def slots_per_token(self) -> int:
        """The most slots (cache entries) one token can take: its own and one per extra step."""
        return 1 + self.max_extra_steps

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The logits of the lm-head inputs a decoded token finished with (..., d)."""
        return self.backbone.lm_head(states)

    @abstractmethod
    def decode_state(self, capacity: int) -> DecodeState:
        """This method's per-row decoding state for an engine of `capacity` rows."""

    def prefill(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run right-padded prompts (n, P) of rows that start empty through a prefill view of the engine's cache;
        the lm-head's input after every token (n, P, d) and the extra steps each ran (n, P). `parallel_prefill`
        methods only."""
        raise NotImplementedError(f"{self.name} decodes its prompts slot by slot")

    # ----- conversion from a model without this method's parts (`train --init-from`, `import --method`) -----

    @staticmethod
    def is_own_part(name: str) -> bool:
        """Whether a parameter (or state-dict entry) is the method's own (router, gates, ...), not the backbone's."""
        return not name.startswith("backbone.")

    def start_as_source(self) -> bool:
        """Set this method's own parts (router, gates) so that the model computes what its backbone computes alone,
        as a model converted from a source without them should at step 0 (docs/design.md §4.4); False where no
        setting does, because every token runs its extra steps."""
        return self.max_extra_steps == 0

    # ----- FLOPs -----

    @abstractmethod
    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        """Total forward FLOPs to run windows (B, T) whose tokens ran `extra_steps` extra steps each."""

    def per_token_flops(self) -> float:
        """FLOPs spent per token outside the layer stack: the lm-head, unless a method adds more."""
        return lm_head_flops(self.config.model)

    def num_matmul_params(self) -> int:
        return self.backbone.num_matmul_params()


class DecodeState:
    """A method's decoding state for each row of the engine: the engine's rows are 0..rows-1 of every tensor.

    Each engine step runs one slot per row. `next_slots` says what that slot is: its input embedding, its cache
    group and the bias its key gets (`ponderlm/kvcache.py`); `absorb` takes the slot's output (the residual stream
    before the final norm) and says which rows finished their token, with the state the lm-head reads and the
    extra steps the token ran. Every tensor attribute has one entry per row and moves with it (`move_row`).
    `phase` is the slot of the current token that runs now: 0 is the token's own slot, k its k-th extra step.
    """

    # Extra step k is a pass (or recursion) with keys of its own: its slot goes in cache group k, not 0.
    passes: ClassVar[bool] = False

    def __init__(self, method: Method, capacity: int):
        weight = method.backbone.lm_head.weight
        self.method, self.backbone = method, method.backbone
        self.phase = torch.zeros(capacity, dtype=torch.long, device=weight.device)
        self.previous = torch.zeros(capacity, method.config.model.hidden_size, dtype=weight.dtype, device=weight.device)
        self.log_tau = torch.zeros(capacity, device=weight.device)  # log of each row's pruning threshold

    def set_tau(self, row: int, tau: float) -> None:
        self.log_tau[row] = math.log(tau) if tau > 0 else float("-inf")

    def move_row(self, source: int, target: int) -> None:
        for value in vars(self).values():
            if torch.is_tensor(value):
                value[target] = value[source]

    def advance(self, rows: int, starting: torch.Tensor) -> torch.Tensor:
        """The phase of this step's slot for rows 0..rows-1: 0 where a token starts, else one more than before."""
        phase = torch.where(starting, 0, self.phase[:rows] + 1)
        self.phase[:rows] = phase
        return phase

    def next_slots(self, rows: int, starting: torch.Tensor, token_embeds: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs (rows, d), cache groups (rows,) and key biases (rows,) of this step's slots; `starting` (rows,)
        marks rows that begin a new token, whose embedding is in `token_embeds` (rows, d). By default a token's
        slot takes its embedding and every extra step the state `absorb` left in `previous`, with no bias."""
        phase = self.advance(rows, starting)
        inputs = torch.where(starting[:, None], token_embeds, self.previous[:rows])
        group = phase if self.passes else torch.zeros_like(phase)
        return inputs, group, torch.zeros(rows, device=phase.device)

    def expected_extra_steps(self, rows: list[int]) -> torch.Tensor | None:
        """The soft allocation sum_{k>=1} w_k of the tokens just finished in `rows`, for methods with a router or
        gates (None: the extra steps run are all there is)."""
        return None

    @abstractmethod
    def absorb(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the slots' outputs (rows, d): finished (rows,) bool, lm-head inputs (rows, d) (read where finished),
        extra steps of the finished tokens (rows,)."""


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
