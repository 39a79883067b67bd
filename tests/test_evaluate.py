"""`evaluate_model`: what training's periodic validation and `ponderlm eval` measure."""

import torch

from ponderlm.config import load_config
from ponderlm.data import TokenShards
from ponderlm.evaluate import evaluate_model
from ponderlm.methods import build_model


def test_evaluation_builds_no_autograd_graph(tiny_data_dir, monkeypatch):
    """Training validates with gradients on around it; the evaluation itself must not record a graph (a
    16K-token Jacobi forward's activations, kept for nothing)."""
    model = build_model(load_config("tiny", [f"data.path={tiny_data_dir}", "model.vocab_size=512",
                                             "method=ponderlm3", "ponder.extra_steps=2"]))
    recorded, infer = [], model.infer

    def recording(ids, tau=None):
        recorded.append(torch.is_grad_enabled())
        return infer(ids, tau)

    monkeypatch.setattr(model, "infer", recording)
    with torch.enable_grad():
        result = evaluate_model(model, TokenShards(tiny_data_dir, "val"), max_tokens=64, scoring="jacobi")
    assert recorded == [False] and result["tokens"] == 64
