"""Checkpoints: written whole or not at all, pruned to keep_last, and refused with one line when they do not fit."""

import pytest
import torch

from ponderlm.checkpoint import list_checkpoints, load_model_weights, save_checkpoint
from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.methods import build_model


def model(method="vanilla"):
    torch.manual_seed(0)
    return build_model(load_config("tiny", [f"method={method}", "model.vocab_size=31"]))


def save(run, step, weights, keep_last=2):
    return save_checkpoint(run, step, weights, {"step": step}, {"method": "vanilla"}, keep_last)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_as_the_latest(tmp_path, monkeypatch):
    weights = model().state_dict()
    save(tmp_path, 1, weights)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, weights)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]


def test_only_the_last_checkpoints_are_kept_and_they_load_back_exactly(tmp_path):
    source = model()
    for step in range(1, 5):
        save(tmp_path, step, source.state_dict(), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    target = model()
    with torch.no_grad():
        target.backbone.lm_head.weight.zero_()
    assert load_model_weights(target, list_checkpoints(tmp_path)[-1])["step"] == "4"
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_weights_of_another_method_are_refused(tmp_path):
    path = save(tmp_path, 1, model("vanilla").state_dict())
    with pytest.raises(PonderError, match="does not fit the configured model"):
        load_model_weights(model("ponderlm3"), path)


def test_a_damaged_weights_file_is_named(tmp_path):
    path = save(tmp_path, 1, model().state_dict())
    (path / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(PonderError, match=f"cannot read checkpoint {path / 'model.safetensors'}"):
        load_model_weights(model(), path)
