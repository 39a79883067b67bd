"""One module per method on the shared backbone; `build_model` picks it from `config.method`."""

from __future__ import annotations

from torch import nn

from ponderlm.config import Config
from ponderlm.methods.vanilla import Vanilla

METHOD_CLASSES: dict[str, type[nn.Module]] = {"vanilla": Vanilla}


def build_model(config: Config) -> nn.Module:
    return METHOD_CLASSES[config.method](config)
