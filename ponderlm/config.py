"""Building a run's Config: a preset or YAML file, then `key=value` overrides, checked against the schema
(`ponderlm/schema.py`) and against the method registry: the method exists, option sections belong to it, and every
`ponder.*` setting is one the method reads (`Method.settings`).

A preset, and a recipe's top-level `set`, describe a family of runs: their settings reach the methods that read
them and are dropped for the others, so `--set method=NAME` alone changes the method. A setting given for this one
run (`--set`, a recipe run's own `set`) that its method does not read is an error, not a silently ignored value. A
run's config.yaml records only what its method reads; an older one with more loads the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ponderlm.errors import PonderError
from ponderlm.methods import METHODS, Method, method_options
from ponderlm.schema import PRESET_DIR, Config, PonderConfig, check_tau, explain_error, read_yaml_mapping, \
    resolve_config_path

__all__ = ["PRESET_DIR", "Config", "check_method", "check_tau", "config_from_dict", "load_config"]


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                shared: list[str] | None = None) -> Config:
    """A validated Config from defaults, an optional YAML file or preset, `shared` overrides (a family's, like the
    preset's) and this run's `overrides`, each `key=value`."""
    merged = OmegaConf.structured(Config)
    try:
        if name_or_path is not None:
            merged = OmegaConf.merge(merged, read_yaml_mapping(resolve_config_path(name_or_path)))
        for item in [*(shared or []), *(overrides or [])]:
            if "=" not in item:
                raise PonderError(f"--set expects key=value, got {item!r}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as exc:
        raise PonderError(explain_error(exc)) from None
    config: Config = OmegaConf.to_object(merged)
    return check_method(config, given=[item.split("=", 1)[0].strip() for item in overrides or []])


def config_from_dict(data: dict) -> Config:
    """A validated Config from a saved one (a run's config.yaml, an export's config.json)."""
    ponder = data.get("ponder") or {}
    if "steps" in ponder and "extra_steps" not in ponder:  # run directories written before K was renamed
        data = {**data, "ponder": {**{k: v for k, v in ponder.items() if k != "steps"}, "extra_steps": ponder["steps"]}}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise PonderError(explain_error(exc)) from None
    return check_method(OmegaConf.to_object(merged))


def check_method(config: Config, given: Iterable[str] = ()) -> Config:
    """Check `config` against its method and validate it: settings the method does not read are reset to their
    defaults, or refused where they were `given` for this run (dotted keys, as in `--set`)."""
    if config.method not in METHODS:
        raise PonderError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    method, given = METHODS[config.method], set(given)
    defaults = PonderConfig()
    for setting in dataclasses.fields(PonderConfig):
        if setting.name not in method.settings:
            if {"ponder", f"ponder.{setting.name}"} & given:
                raise PonderError(f"ponder.{setting.name}: {method.name} runs do not read it ({_reads(method)}); "
                                  "drop it")
            setattr(config.ponder, setting.name, getattr(defaults, setting.name))
    for name in list(config.options):
        if name not in METHODS or METHODS[name].Options is None:
            with_options = [n for n, m in METHODS.items() if m.Options is not None]
            raise PonderError(f"options.{name}: no method {name!r} takes options (methods with options: "
                              f"{', '.join(with_options) or 'none'})")
        method_options(config, METHODS[name])
        if name != method.name:
            if any(key == "options" or key.startswith(f"options.{name}") for key in given):
                raise PonderError(f"options.{name}: {method.name} runs do not read them; drop them")
            del config.options[name]
    return config.validate()


def _reads(method: type[Method]) -> str:
    own = [f"ponder.{name}" for name in method.settings] + ([f"options.{method.name}"] if method.Options else [])
    return f"it reads {', '.join(own)}" if own else "it has no ponder settings"
