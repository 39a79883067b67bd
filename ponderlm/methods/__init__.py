"""One module per method on the shared backbone; `build_model` picks it from `config.method`."""

from __future__ import annotations

from torch import nn

from ponderlm.config import Config
from ponderlm.methods.baselines import Loop, Pause, PonderLM1
from ponderlm.methods.latent import PonderLM2, PonderLM3
from ponderlm.methods.vanilla import Vanilla

METHOD_CLASSES: dict[str, type[nn.Module]] = {
    "vanilla": Vanilla, "pause": Pause, "loop": Loop, "ponderlm1": PonderLM1, "ponderlm2": PonderLM2,
    "ponderlm3": PonderLM3,
}


def build_model(config: Config) -> nn.Module:
    return METHOD_CLASSES[config.method](config)
