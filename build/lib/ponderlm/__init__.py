"""ponderlm: pretrain, evaluate and serve language models that ponder in continuous space."""

from ponderlm.runs import load

__all__ = ["load"]
__version__ = "0.1.0"
