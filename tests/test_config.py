"""Config presets, overrides and validation."""

import pytest
import torch

import yaml

from ponderlm.checkpoint import read_run_config
from ponderlm.config import PRESET_DIR, load_config
from ponderlm.errors import PonderError
from ponderlm.methods import METHODS

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_the_documented_presets_ship_inside_the_package():
    assert {"tiny", "small", "125m", "410m", "1.4b"} <= set(PRESETS)
    assert PRESET_DIR.parent.name == "ponderlm"  # package data: found by an installed wheel too


def test_a_preset_is_found_by_name_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("small").model.hidden_size == 256


def test_a_run_directory_written_before_k_was_renamed_still_loads(tmp_path):
    old = load_config("small").to_dict()
    old["ponder"]["steps"] = old["ponder"].pop("extra_steps")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert read_run_config(tmp_path).ponder.extra_steps == 2


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS)
def test_one_field_switches_any_preset_to_any_method(preset, method):
    config = load_config(preset, [f"method={method}"])
    baseline = load_config(preset)
    assert config.method == method
    assert (config.model, config.data, config.train) == (baseline.model, baseline.data, baseline.train)


def test_overrides_reach_nested_and_list_values():
    config = load_config("tiny", ["ponder.train_refine_passes=[1,4]", "train.lr=0.5", "ponder.tau=0.01"])
    assert config.ponder.train_refine_passes == [1, 4] and config.train.lr == 0.5 and config.ponder.tau == 0.01


@pytest.mark.parametrize("override,message", [
    ("train.batch_tokens=100", "not a multiple"),
    ("model.num_attention_heads=3", "heads"),
    ("train.dtype=fp16", "fp32, bf16 or auto"),
    ("distributed.strategy=mpi", "none, ddp or fsdp"),
    ("ponder.tau=1.5", "ponder.tau"),
    ("ponder.extra_steps=-1", "ponder.extra_steps"),
    ("method=ponder4", "unknown method"),
])
def test_bad_values_are_explained(override, message):
    with pytest.raises(PonderError, match=message):
        config = load_config("tiny", [override])
        config.grad_accum_steps()


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_uses_bf16_only_where_the_hardware_has_it(native, monkeypatch):
    monkeypatch.setattr("ponderlm.config.native_bf16", lambda device_type: native)
    config = load_config("tiny", ["train.dtype=auto"])
    with config.autocast("cpu"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if native else torch.float32)
