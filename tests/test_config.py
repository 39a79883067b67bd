"""Config presets, overrides and validation."""

import pytest
import torch

import yaml

from ponderlm.config import PRESET_DIR, load_config
from ponderlm.errors import PonderError
from ponderlm.machine import autocast
from ponderlm.methods import METHODS
from ponderlm.rundir import RunDir
from ponderlm.schema import PonderConfig

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
    assert RunDir(tmp_path).read_config().ponder.extra_steps == 2


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS)
def test_one_field_switches_any_preset_to_any_method(preset, method):
    config = load_config(preset, [f"method={method}"])
    baseline = load_config(preset)
    assert config.method == method
    assert (config.model, config.data, config.train) == (baseline.model, baseline.data, baseline.train)


def test_overrides_reach_nested_and_list_values():
    config = load_config("tiny", ["method=ponderlm3", "ponder.train_refine_passes=[1,4]", "train.lr=0.5",
                                  "ponder.tau=0.01"])
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
        config = load_config("tiny", ["method=ponderlm3", override])
        config.grad_accum_steps()


def test_a_setting_given_for_a_method_that_does_not_read_it_is_refused():
    with pytest.raises(PonderError, match=r"^ponder.penalty: loop runs do not read it \(it reads ponder.extra_steps\); "
                                          "drop it$"):
        load_config("tiny", ["method=loop", "ponder.penalty=0.1"])
    with pytest.raises(PonderError, match="ponder.extra_steps: vanilla runs do not read it .it has no ponder settings"):
        load_config("tiny", ["ponder.extra_steps=2"])
    with pytest.raises(PonderError, match="^options.mor: ponderlm3 runs do not read them; drop them$"):
        load_config("tiny", ["method=ponderlm3", "options.mor.fixed_depth=1"])


def test_a_family_setting_reaches_the_methods_that_read_it_and_no_other():
    """A preset (and a recipe's shared `set`) is for every method: `--set method=NAME` alone changes the method, and
    a run's config records only what its method reads."""
    assert load_config("small", ["method=ponderlm3"]).ponder.penalty == 0.002
    loop = load_config("small", ["method=loop"]).ponder
    assert loop.extra_steps == 2 and loop.penalty == PonderConfig().penalty
    assert load_config("small", ["method=vanilla"]).ponder == PonderConfig()
    shared = ["ponder.penalty=0.1", "options.mor.fixed_depth=1"]
    assert load_config("tiny", ["method=mor"], shared=shared).options == {"mor": {"fixed_depth": 1}}
    vanilla = load_config("tiny", [], shared=shared)
    assert vanilla.ponder == PonderConfig() and vanilla.options == {}


def test_a_saved_config_with_settings_its_method_does_not_read_loads_without_them(tmp_path):
    """Run directories written before methods declared their settings hold the preset's whole ponder section."""
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config("tiny").to_dict()
    saved["ponder"].update(penalty=0.002, router_init_bias=2.0, extra_steps=2)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert RunDir(run).read_config().ponder == PonderConfig()
    saved["method"] = "ponder4"  # an edited method: one line, not a KeyError
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(PonderError, match="config.yaml: unknown method 'ponder4'.*restore the file"):
        RunDir(run).read_config()


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_uses_bf16_only_where_the_hardware_has_it(native, monkeypatch):
    monkeypatch.setattr("ponderlm.machine.native_bf16", lambda device_type: native)
    config = load_config("tiny", ["train.dtype=auto"])
    with autocast(config, "cpu"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if native else torch.float32)
