"""Everything about running on several processes lives here; the model and methods know nothing of it.

Launch with torchrun (`torchrun --nproc-per-node N -m ponderlm train ...`, multi-node through its rendezvous).
`distributed.strategy`: `none` (one process), `ddp` (DistributedDataParallel) or `fsdp` (FSDP2 `fully_shard` on
every block, then on the root). The backend follows the device: nccl on CUDA, gloo on CPU.

Training calls the model (`Method.forward` with targets is the training objective), so DDP and FSDP2 hook in where
they do for any model; FSDP2 also gathers the parameters around `infer`, which validation calls. Checkpoints hold
full, unsharded state keyed by parameter name, so a run saved at one world size resumes at any other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ponderlm.errors import PonderError


@dataclass
class Topology:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(strategy: str) -> Topology:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and strategy == "none":
        raise PonderError(f"launched on {world_size} processes but distributed.strategy=none; "
                          "add --set distributed.strategy=ddp (or fsdp)")
    if world_size == 1:
        return Topology(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Topology(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, strategy: str, topology: Topology, compile_blocks: bool = False) -> nn.Module:
    """Wrap a method for training on this topology; returns the module to call as `wrapped(inputs, targets, ...)`
(the model itself, sharded in place under FSDP2; a DistributedDataParallel wrapper under DDP).

    compile_blocks: torch.compile each block first, as torchtitan does: small graphs, one compile reused by
    every layer (the first steps pay the compile time).
    """
    if compile_blocks:
        # Every layer shares Block.forward's compile cache, and a latent method meets it with and without a key
        # bias, in training and evaluation, at several slot counts: more variants than dynamo's default limit of 8
        # (past which it silently runs the rest eagerly; seen in the demo's first evaluation).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in model.backbone.layers:
            block.compile()
    if topology.world_size == 1 or strategy == "none":
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.backbone.layers:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "infer")
    return model


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_over_ranks(values: dict[str, float], topology: Topology) -> dict[str, float]:
    if topology.world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=topology.device)
    dist.all_reduce(tensor)
    return {k: v / topology.world_size for k, v in zip(keys, tensor.tolist())}


def barrier(topology: Topology) -> None:
    if topology.world_size > 1:
        dist.barrier()


def _inner(wrapped: nn.Module) -> nn.Module:
    return wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model weights, named as in the bare model (collective under FSDP: call on every rank)."""
    return get_model_state_dict(_inner(wrapped), options=FULL)


def load_full_model_state(wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(_inner(wrapped), state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(_inner(wrapped), optimizer, options=FULL)


def load_full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(_inner(wrapped), optimizer, state, options=StateDictOptions(full_state_dict=True))
