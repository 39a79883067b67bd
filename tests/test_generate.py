"""Generation through the engine: greedy equals the full forward's argmax; batched equals one prompt at a time."""

import pytest
import torch

from ponderlm.config import load_config
from ponderlm.data import EOS_TOKEN, load_tokenizer
from ponderlm.generate import generate, generate_many, sample_next
from ponderlm.methods import build_model


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def make(method, tokenizer):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={tokenizer.get_vocab_size()}"],
                         shared=["ponder.extra_steps=2"])
    model = build_model(config).eval()
    if method == "ponderlm3":  # a decisive router, so tokens keep different numbers of slots
        with torch.no_grad():
            model.router.weight.normal_(0, 0.5)
            model.router.bias.normal_(0, 1)
    return model


@pytest.mark.parametrize("method", ["vanilla", "pause"])
def test_greedy_generation_is_the_full_forward_argmax_until_eos(method, tokenizer):
    model = make(method, tokenizer)
    pieces = []
    text = generate(model, tokenizer, "The King", max_new_tokens=12, on_text=pieces.append)
    assert "".join(pieces) == text
    ids = tokenizer.encode("The King").ids
    new = []
    for _ in range(12):
        with torch.no_grad():
            token = model(torch.tensor([ids + new]))[0, -1].argmax().item()
        if token == tokenizer.token_to_id(EOS_TOKEN):
            break
        new.append(token)
    assert text == tokenizer.decode(new) and len(new) > 0


def test_sampling_is_seeded_and_the_seed_matters(tokenizer):
    model = make("vanilla", tokenizer)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    first = generate(model, tokenizer, "I", seed=1, **kwargs)
    assert first == generate(model, tokenizer, "I", seed=1, **kwargs)
    assert any(generate(model, tokenizer, "I", seed=s, **kwargs) != first for s in range(2, 6))


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, 1.0, generator)) for _ in range(200)}
    assert draws == {1, 3}  # top-2
    draws = {int(sample_next(logits, 1.0, 0, 0.3, generator)) for _ in range(200)}
    assert draws == {1}  # token 1 alone already holds more than 30 % of the mass
    assert int(sample_next(logits, 0.0, 0, 1.0, None)) == 1  # temperature 0: greedy


def test_the_extra_steps_of_each_generated_token_are_those_its_predecessor_ran(tokenizer):
    model = make("ponderlm3", tokenizer)
    prompt = "Four score and seven years"
    steps = []
    text = generate(model, tokenizer, prompt, max_new_tokens=5, tau=0.2, extra_steps_per_token=steps)
    ids = tokenizer.encode(prompt).ids
    new = tokenizer.encode(prompt + text).ids[len(ids):]
    assert len(steps) == len(new) == 5
    with torch.no_grad():
        _, parallel = model.infer(torch.tensor([ids + new[:-1]]), 0.2)
    assert steps == parallel[0, len(ids) - 1:].tolist()


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_batched_generation_equals_one_prompt_at_a_time(method, tokenizer):
    model = make(method, tokenizer)
    prompts = ["The King", "Four score and seven years ago", "I", "", "Whether 'tis nobler in the mind to suffer"]
    tau = 0.2 if model.prunable else None
    for sampling in ({}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
        batched = generate_many(model, tokenizer, prompts, max_new_tokens=8, tau=tau, max_batch=2, **sampling)
        for index, (prompt, result) in enumerate(zip(prompts, batched)):
            steps = []
            seed = sampling.get("seed", 0) + index  # prompt i samples with seed + i
            alone = generate(model, tokenizer, prompt, max_new_tokens=8, tau=tau, extra_steps_per_token=steps,
                             **{**sampling, "seed": seed})
            assert (result.text, result.extra_steps) == (alone, steps)
    assert len({result.text for result in batched}) > 1


def test_generation_prunes_at_the_tau_it_is_given(tokenizer):
    model = make("ponderlm3", tokenizer)
    steps = {}
    for tau in (0.0, 0.99):
        steps[tau] = []
        generate(model, tokenizer, "Four score", max_new_tokens=6, tau=tau, extra_steps_per_token=steps[tau])
    assert set(steps[0.0]) == {2} and min(steps[0.99]) < 2  # tau 0 keeps every slot; 0.99 prunes some
    assert model.config.ponder.tau == 1e-4  # the run's own tau is untouched
