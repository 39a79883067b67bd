"""Checkpoints: written whole or not at all, pruned to keep_last, and refused with one line when they do not fit."""

import pytest
import torch
from safetensors.torch import save_file

from ponderlm.checkpoint import (list_checkpoints, load_model_weights, load_trainer_state, read_model_weights,
                                 save_checkpoint)
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
    (path / "checksums.json").unlink()  # a checkpoint from before checksums: the format check still names it
    (path / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(PonderError, match=f"cannot read checkpoint {path / 'model.safetensors'}"):
        load_model_weights(model(), path)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_checkpoint_file_corrupted_in_place_fails_its_saved_sha256(tmp_path, name):
    path = save(tmp_path, 1, model().state_dict())
    raw = bytearray((path / name).read_bytes())
    raw[-5] ^= 0x01  # one bit, same size: safetensors and torch.load would read it without complaint
    (path / name).write_bytes(bytes(raw))
    read = (lambda: load_model_weights(model(), path)) if name == "model.safetensors" else \
        (lambda: load_trainer_state(path))
    with pytest.raises(PonderError, match=f"{path / name} does not match the sha256 recorded when it was saved"):
        read()


def test_non_finite_weights_are_never_saved_and_a_file_holding_them_is_refused(tmp_path):
    weights = {name: tensor.clone() for name, tensor in model().state_dict().items()}
    save(tmp_path, 1, weights, keep_last=1)
    weights["backbone.norm.weight"][3] = float("inf")
    with pytest.raises(PonderError, match="step 2's weights .*non-finite values .*backbone.norm.weight"):
        save(tmp_path, 2, weights, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    bad = tmp_path / "step_0000001" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, bad)  # a file from elsewhere, with inf inside
    (bad.parent / "checksums.json").unlink()  # as in checkpoints written before checksums were
    with pytest.raises(PonderError, match=f"the weights in {bad} hold non-finite values"):
        read_model_weights(bad.parent)
