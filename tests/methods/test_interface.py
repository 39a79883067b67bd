"""The method interface: every registered method honours it, and a new method is one module plus one registry line."""

import copy
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import yaml

import ponderlm
from ponderlm.cli import build_parser, main
from ponderlm.config import load_config
from ponderlm.engine import teacher_forced
from ponderlm.errors import PonderError
from ponderlm.methods import METHODS, Method, build_model
from ponderlm.methods.vanilla import Vanilla
from ponderlm.schema import PonderConfig
from ponderlm.sweep import run_sweep

VOCAB = 47
TOKENS = 7


def make(method, *settings):
    """A tiny model of `method`; `settings` as a recipe's shared `set` (each reaches the methods that read it)."""
    torch.manual_seed(0)
    K = 2
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={VOCAB}"],
                         shared=[f"ponder.extra_steps={K}", f"ponder.eval_refine_passes={(K + 1) * TOKENS}", *settings])
    model = build_model(config).eval()
    if model.adaptive:  # a decisive allocation (router, gates), so tokens run different numbers of extra steps
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.startswith("backbone."):
                    parameter.normal_(0, 0.5 if parameter.dim() == 2 else 1.0)
    return model


@pytest.mark.parametrize("name", METHODS)
def test_every_method_decodes_what_its_parallel_inference_computes(name):
    model = make(name)
    assert isinstance(model, Method) and model.name == name
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    tau = 0.2 if model.prunable else None
    with torch.no_grad():
        logits, extra = model.infer(ids, tau)
        seen = model.inspect(ids, tau)
    for prefill in (False, True):  # slot by slot, and from a parallel prefill where the method has one
        decoded, used = teacher_forced(model, ids, tau, prefill=prefill)
        torch.testing.assert_close(decoded, logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(used, extra)
    assert torch.equal(seen.logits, logits) and torch.equal(seen.extra_steps, extra)
    assert int(extra.min()) >= 0 and int(extra.max()) <= model.max_extra_steps
    if model.adaptive:
        assert len(extra.unique()) > 1  # the check covered tokens with different numbers of steps
    else:
        assert (extra == model.max_extra_steps).all()
        torch.testing.assert_close(seen.expected_extra_steps, extra.float())
    assert model.inference_flops(extra) > 0 and model.training_flops_per_token() > 0


@pytest.mark.parametrize("name", METHODS)
def test_training_loss_is_the_cross_entropy_of_the_inference_logits(name):
    """With no term beyond the cross-entropy (penalty 0; mor's balancing weight 0) and nothing pruned (tau 0), the
    fused lm-head + cross-entropy of the training objective (the module's forward with targets) equals
    F.cross_entropy of `infer`'s logits, in value and in gradient: training optimises what inference computes, for
    every method."""
    own_terms = ["options.mor.balance_weight=0"] if name == "mor" else []
    model = make(name, "ponder.train_refine_passes=[7]", "ponder.eval_refine_passes=7", "ponder.penalty=0", *own_terms)
    if model.adaptive:
        with torch.no_grad():  # an allocation that varies by token, so the check covers a real mixture
            for parameter in (p for n, p in model.named_parameters() if not n.startswith("backbone.")):
                parameter.normal_(0, 0.5)
    ids = torch.randint(0, VOCAB, (2, TOKENS + 1))
    loss, _ = model(ids[:, :-1], ids[:, 1:], train_step=1)
    logits = model.infer(ids[:, :-1], 0.0 if model.prunable else None)[0]
    torch.testing.assert_close(model(ids[:, :-1]), model.infer(ids[:, :-1])[0], rtol=0, atol=0)
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    parameters = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, parameters, allow_unused=True)
    expected = torch.autograd.grad(reference, parameters, allow_unused=True)
    for g, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_changing_a_later_token_never_changes_earlier_logits(name):
    model = make(name)
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 3, 5):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
            torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.prunable])
def test_tau_is_an_argument_on_both_paths_and_never_read_from_a_mutated_config(name):
    model = make(name)
    ids = torch.randint(0, VOCAB, (1, TOKENS))
    with torch.no_grad():
        _, all_slots = model.infer(ids, 0.0)
        _, pruned = model.infer(ids, 0.99)
    assert (all_slots == model.max_extra_steps).all() and (pruned < model.max_extra_steps).any()
    for tau, expected in ((0.0, all_slots), (0.99, pruned)):
        assert torch.equal(teacher_forced(model, ids, tau)[1], expected)
    assert model.config.ponder.tau == 1e-4  # no call changed the run's own tau


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.prunable])
def test_a_larger_tau_never_runs_more_extra_steps_or_flops(name):
    model = make(name)
    ids = torch.randint(0, VOCAB, (4, TOKENS))
    steps, flops = [], []
    with torch.no_grad():
        for tau in (0.0, 1e-3, 0.05, 0.2, 0.5, 0.9, 0.999):
            _, extra = model.infer(ids, tau)
            steps.append(extra.float().mean().item())
            flops.append(model.inference_flops(extra))
    assert steps == sorted(steps, reverse=True) and flops == sorted(flops, reverse=True)
    assert steps[0] == model.max_extra_steps and steps[-1] < steps[0]


# A value other than the default for every ponder.* setting (a new setting must be added here).
CHANGED_SETTINGS = {"extra_steps": 1, "train_refine_passes": [1], "eval_refine_passes": 1, "backprop_passes": 1,
                    "router_init_bias": 1.5, "router_warmup_steps": 5, "router_fixed": [0.2, 0.3, 0.5], "penalty": 0.5,
                    "tau": 0.5, "renormalize_pruned": False}


def _computed(config) -> list[torch.Tensor]:
    """Everything a method computes from its config: initial weights, the loss at step 1 and its gradients, the
    logits at the run's tau and at tau 0.5 (which prunes an untrained router's or gates' last slot), the training
    FLOPs."""
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, VOCAB, (2, TOKENS + 1), generator=torch.Generator().manual_seed(1))
    loss, _ = model.loss(ids[:, :-1], ids[:, 1:], train_step=1)
    parameters = list(model.parameters())
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    with torch.no_grad():
        logits = [model.infer(ids[:, :-1], tau)[0] for tau in (None, 0.5)]
    return [*parameters, loss, *(g for g in grads if g is not None), *logits,
            torch.tensor(model.training_flops_per_token())]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", METHODS)
def test_a_method_reads_exactly_the_settings_it_declares(name):
    """Every ponder.* setting a method does not declare leaves all it computes unchanged (so refusing or dropping it
    loses nothing), and every one it declares changes something (so the declaration is not wider than the code)."""
    assert set(CHANGED_SETTINGS) == {f.name for f in dataclasses.fields(PonderConfig)}
    base = load_config("tiny", [f"method={name}", f"model.vocab_size={VOCAB}"], shared=["ponder.extra_steps=2"])
    reference = _computed(base)
    for setting, value in CHANGED_SETTINGS.items():
        changed = copy.deepcopy(base)  # set past the config builder, which would reset an unread setting
        setattr(changed.ponder, setting, value)
        assert _same(_computed(changed), reference) == (setting not in METHODS[name].settings), setting


# ----- a new method: this module, plus one registry line (monkeypatched here) -----

@dataclass
class TemperatureOptions:
    temperature: float = 1.0


class Tempered(Vanilla):
    """vanilla with its logits divided by a fixed temperature, an option of its own."""

    name = "tempered"
    Options = TemperatureOptions

    def infer(self, input_ids, tau=None):
        logits, extra_steps = super().infer(input_ids, tau)
        return logits / self.options.temperature, extra_steps

    def logits(self, states):
        return super().logits(states) / self.options.temperature


@pytest.fixture
def tempered(monkeypatch):
    monkeypatch.setitem(METHODS, Tempered.name, Tempered)


def test_a_new_method_runs_through_every_command(tempered, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--set", f"data.path={tiny_data_dir}", "--set", "train.steps=4", "--set", "train.save_every=4"]
    assert main(["train", "tiny", "--out", str(run), "--set", "method=tempered",
                 "--set", "options.tempered.temperature=2.0", *common]) == 0
    assert main(["eval", str(run), "--max-tokens", "100"]) == 0
    assert main(["generate", str(run), "--prompt", "Four score", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[1])["method"] == "tempered"

    model, _ = ponderlm.load(run)
    assert isinstance(model, Tempered) and model.options.temperature == 2.0
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        plain = Vanilla.infer(model, ids)[0]
    torch.testing.assert_close(model(ids), plain / 2.0)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "tiny", "set": [f"data.path={tiny_data_dir}", "train.steps=2"],
                                      "eval": {"max_tokens": 64}, "runs": [{"name": "t", "set": ["method=tempered"]}]}))
    rows = run_sweep(recipe, tmp_path / "sweep", progress=False)
    assert [row["method"] for row in rows] == ["tempered"] and (tmp_path / "sweep" / "pareto.png").is_file()
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "tempered" in help_text


def test_method_options_are_typed_and_checked(tempered):
    assert load_config("tiny", ["method=tempered"]).options == {}
    assert build_model(load_config("tiny", ["method=tempered", "model.vocab_size=11"])).options.temperature == 1.0
    with pytest.raises(PonderError, match="options.tempered.*known keys: temperature"):
        load_config("tiny", ["method=tempered", "options.tempered.temprature=2"])
    with pytest.raises(PonderError, match="options.tempered"):
        load_config("tiny", ["options.tempered.temperature=warm"])
    with pytest.raises(PonderError, match="no method 'vanilla' takes options.*tempered"):
        load_config("tiny", ["options.vanilla.temperature=2"])


def test_a_method_must_implement_infer_or_inspect():
    """Each has a default made of the other: a method with neither fails at construction, not in endless recursion."""
    class Silent(Vanilla):
        infer, inspect = Method.infer, Method.inspect

    with pytest.raises(TypeError, match="Silent implements neither infer nor inspect"):
        Silent(load_config("tiny"))
