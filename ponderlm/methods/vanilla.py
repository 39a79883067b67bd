"""`vanilla`: the backbone as a standard causal language model, the reference every method is compared with.

It is `loop` with no extra pass: the layer stack once per token, a one-pass cache, the FLOPs of one pass.
"""

from __future__ import annotations

from ponderlm.schema import Config
from ponderlm.methods.baselines import Loop


class Vanilla(Loop):
    name = "vanilla"
    settings = ()
    backbone_only = True

    def __init__(self, config: Config):
        super().__init__(config, max_extra_steps=0)
