"""The methods: one module each on the shared backbone, behind the interface in `base.py`.

`METHODS` is the only list of method names in the package: the config, the command line and the sweep read it.
Adding a method is one new module with a `Method` subclass, plus one line here.
"""

from __future__ import annotations

import torch

from ponderlm.schema import Config
from ponderlm.methods.base import Inspection, Method, method_options
from ponderlm.methods.baselines import Loop, Pause, PonderLM1
from ponderlm.methods.halting import Halting
from ponderlm.methods.latent import PonderLM2, PonderLM3
from ponderlm.methods.mor import MoR
from ponderlm.methods.vanilla import Vanilla

METHODS: dict[str, type[Method]] = {method.name: method for method in (
    Vanilla,
    Pause,
    Loop,
    PonderLM1,
    PonderLM2,
    PonderLM3,
    Halting,
    MoR,
)}


def build_model(config: Config) -> Method:
    return METHODS[config.method](config)


def model_skeleton(config: Config) -> Method:
    """The model's structure without its weights (the meta device allocates nothing): for what follows from the
    config alone, FLOPs, tau and constants, at any size (a 1.4B model's weights would be ~5.6 GB for a constant)."""
    with torch.device("meta"):
        return build_model(config)


def empty_model(config: Config, device: torch.device | str = "cpu") -> Method:
    """The model with memory for every weight and none of them initialised, for a checkpoint to fill: built on the
    meta device, then each parameter allocated with `torch.empty` (not `Module.to_empty`, whose meta `empty_like`
    imports sympy; benchmarks/results/load_time.md), shared weights shared again."""
    model = model_skeleton(config)
    # Buffers computed at construction would stay garbage here; no method has one (tests/test_rundir.py loads each).
    if any(True for _ in model.buffers()):
        raise NotImplementedError(f"{config.method} has buffers, which empty_model cannot fill")
    allocated: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in allocated:
                allocated[id(parameter)] = torch.nn.Parameter(
                    torch.empty(parameter.shape, dtype=parameter.dtype, device=device), parameter.requires_grad)
            setattr(module, name, allocated[id(parameter)])
    return model


__all__ = ["METHODS", "Inspection", "Method", "build_model", "empty_model", "method_options", "model_skeleton"]
