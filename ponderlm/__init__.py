"""ponderlm: pretrain, evaluate and serve language models that ponder in continuous space."""

__all__ = ["load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `ponderlm.load` imports torch on first use only: `ponderlm data ...` and its worker processes never need it.
    if name == "load":
        from ponderlm.rundir import load

        return load
    raise AttributeError(f"module 'ponderlm' has no attribute {name!r}")
