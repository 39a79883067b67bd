"""`ponderlm.load`: a run's model from its latest checkpoint, with no random initialisation to overwrite."""

import pytest
import torch

import ponderlm
from ponderlm.checkpoint import read_model_weights, with_tied_weights
from ponderlm.config import load_config
from ponderlm.methods import METHODS
from ponderlm.model import Transformer
from ponderlm.rundir import RunDir
from ponderlm.train import train


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("tied", [True, False])
def test_load_fills_every_weight_from_the_checkpoint_without_initialising_any(method, tied, tiny_data_dir, tmp_path,
                                                                              monkeypatch):
    run = tmp_path / "run"
    config = load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=1", f"method={method}",
                                  f"model.tie_word_embeddings={str(tied).lower()}"], shared=["ponder.extra_steps=2"])
    train(config, run, progress=False)
    initialised_on, real = [], Transformer.reset_parameters
    monkeypatch.setattr(Transformer, "reset_parameters",
                        lambda self: initialised_on.append(self.embed_tokens.weight.device.type) or real(self))
    model, _ = ponderlm.load(run)
    assert initialised_on == ["meta"]  # the structure only: no random numbers drawn for weights the checkpoint has
    assert (model.backbone.lm_head.weight is model.backbone.embed_tokens.weight) == tied
    stored = with_tied_weights(model, read_model_weights(RunDir(run).latest_checkpoint()))
    assert set(stored) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name
