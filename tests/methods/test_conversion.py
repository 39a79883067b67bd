"""A model converted from a source without its method's parts (`train --init-from`, `import --method`) computes what
the source computes at step 0, and training still moves its allocation onto extra steps where they help."""

import pytest
import torch
import torch.nn.functional as F

from ponderlm.config import load_config
from ponderlm.data import TokenShards
from ponderlm.batching import eval_batches
from ponderlm.sources import load_initial_weights
from ponderlm.methods import METHODS, build_model
from ponderlm.methods.base import SOURCE_MARGIN
from ponderlm.train import train

ADAPTIVE = [name for name, method in METHODS.items() if method.adaptive]


@pytest.fixture(scope="module")
def source(tiny_data_dir, tmp_path_factory):
    """A vanilla run trained for 30 steps: a source whose predictions are better than chance."""
    run = tmp_path_factory.mktemp("source") / "vanilla"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=30", "model.embedding_scale=false"]), run,
          progress=False)
    return run


def validation_windows(data_dir, count=8):
    inputs, targets = next(eval_batches(TokenShards(data_dir, "val"), 32, count, count * 32))
    return inputs, targets


def converted(method, data_dir, source, *overrides):
    config = load_config("tiny", [f"data.path={data_dir}", f"method={method}", "model.embedding_scale=false",
                                  f"model.vocab_size={source_vocab(source)}"], shared=["ponder.extra_steps=2", *overrides])
    torch.manual_seed(1)
    model = build_model(config)
    load_initial_weights(source, model)
    return model.eval()


def source_vocab(source):
    from ponderlm.rundir import RunDir

    return RunDir(source).read_config().model.vocab_size


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item()


@pytest.mark.parametrize("method", ADAPTIVE)
def test_a_converted_model_has_its_sources_loss_at_step_0(method, source, tiny_data_dir):
    vanilla = converted("vanilla", tiny_data_dir, source)
    model = converted(method, tiny_data_dir, source)
    inputs, targets = validation_windows(tiny_data_dir)
    with torch.no_grad():
        expected = cross_entropy(vanilla.infer(inputs)[0], targets)
        taus = [0.0, None] if model.prunable else [None]
        for tau in taus:  # every latent slot kept and softly masked; then the default hard rule
            logits, extra_steps = model.infer(inputs, tau)
            assert abs(cross_entropy(logits, targets) - expected) < 1e-4, tau
        assert (extra_steps == 0).all()  # the default tau runs none of the extra steps: exactly the source
        torch.testing.assert_close(logits, vanilla.infer(inputs)[0], rtol=0, atol=1e-5)
    fresh = build_model(model.config).eval()  # the method's own init instead: the source's function is gone
    with torch.no_grad():
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")},
                              strict=False)
        assert abs(cross_entropy(fresh.infer(inputs, 0.0 if fresh.prunable else None)[0], targets) - expected) > 1e-2


def where_extra_steps_help(model, inputs):
    """Targets the converted model's last extra step predicts better than its source path does: at each position the
    token whose log-probability gains most from the token's own state (k = 0, depth 1) to the last latent slot's
    (computed as the model runs it, latent keys almost invisible) or mor's output after every recursion. By the
    convexity of cross-entropy, moving mass toward the extra steps then lowers the loss."""
    with torch.no_grad():
        if model.latent_slots:
            states = model.inspect(inputs, 0.0).slot_states
            source, deeper = (model.backbone.lm_head(states[..., k, :]) for k in (0, -1))
        else:
            source = model.infer(inputs)[0]
            model.router.bias.zero_()
            model.router.bias[-1] = SOURCE_MARGIN
            deeper = model.infer(inputs)[0]
            model.start_as_source()
        return (deeper.log_softmax(-1) - source.log_softmax(-1)).argmax(-1)


def allocations(model, inputs, targets, steps):
    """The mean expected extra steps of a converted model, then after each of `steps` AdamW steps of its own parts
    (router or gates) on (inputs, targets)."""
    model.start_as_source()
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("backbone.")],
                                  lr=1e-2, weight_decay=0.0)
    found = []
    for step in range(1, steps + 2):
        model.eval()
        with torch.no_grad():
            found.append(model.inspect(inputs).expected_extra_steps.mean().item())
        if step <= steps:
            model.train()
            loss, _ = model.loss(inputs, targets, train_step=step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return found


@pytest.mark.parametrize("method", ADAPTIVE)
def test_training_moves_a_converted_models_allocation_onto_extra_steps_that_help(method, source, tiny_data_dir):
    """The constructed case: targets that the last extra step predicts better than the source path does. From the source's function (allocation ~e^-12, a saddle: every gradient toward the extra steps is scaled by
    their mass), Adam's steps grow the allocation by orders of magnitude within a dozen steps."""
    model = converted(method, tiny_data_dir, source, "ponder.penalty=0", "ponder.train_refine_passes=[1]")
    inputs, _ = validation_windows(tiny_data_dir, count=2)
    found = allocations(model, inputs, where_extra_steps_help(model, inputs), steps=12)
    assert found[0] < 1e-4 and found[-1] > 100 * found[0], found
    assert all(later > earlier for earlier, later in zip(found, found[1:])), found  # steadily
