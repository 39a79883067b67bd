"""The inference engine: batching changes nothing but speed, and a pruned slot costs nothing."""

import random

import pytest
import torch
import torch.nn.functional as F

from ponderlm.config import load_config
from ponderlm.engine import Engine, Request, Sampling, score
from ponderlm.errors import PonderError
from ponderlm.evaluate import evaluate_model
from ponderlm.methods import METHODS, build_model

VOCAB = 53


def make(method, *overrides):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={VOCAB}"],
                         shared=["ponder.extra_steps=2", *overrides])
    model = build_model(config).eval()
    if model.adaptive:  # a decisive allocation (router, gates), so tokens run different numbers of extra steps
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.startswith("backbone."):
                    parameter.normal_(0, 0.5 if parameter.dim() == 2 else 1.0)
    return model


def ragged_requests(model, count=7, seed=0, **kwargs):
    rng = random.Random(seed)
    tau = 0.3 if model.prunable else None
    return [Request([rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))], max_new_tokens=rng.randint(0, 10),
                    tau=tau, keep_logits=True, **kwargs) for _ in range(count)]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("prefill", [True, False])
def test_a_batch_computes_what_each_sequence_computes_alone(name, prefill):
    """Ragged prompts, rows finishing at different steps, and (3 rows for 7 requests) sequences joining mid-flight:
    every logit, extra step and generated token equals that of the sequence decoded alone."""
    model = make(name)
    requests = ragged_requests(model, stop_ids=(7,))
    alone = [Engine(model, max_batch=1, prefill=prefill).run([r])[0] for r in requests]
    engine = Engine(model, max_batch=3, prefill=prefill)
    together = engine.run(requests)
    for a, b in zip(alone, together):
        assert (a.tokens, a.extra_steps, a.finish_reason) == (b.tokens, b.extra_steps, b.finish_reason)
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), rtol=1e-5, atol=1e-5)
    assert {len(s.tokens) for s in together} != {0} and len({len(s.tokens) for s in together}) > 1
    assert not engine.busy and engine.rows == [] and int(engine.cache.lengths.sum()) == 0  # every row freed


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.latent_slots and not m.parallel_prefill])
def test_pruned_slots_are_neither_computed_nor_cached(name):
    """Count the rows the first layer sees: one per slot each token kept, never one for a pruned slot; and a row's
    cache holds exactly the slots its tokens ran."""
    model = make(name)
    seen = []
    hook = model.backbone.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    engine = Engine(model, max_batch=4)
    sequences = [engine.add(r) for r in ragged_requests(model, count=6, seed=1)]
    try:
        while engine.busy:
            engine.step()
            for row, sequence in enumerate(engine.rows):
                if engine.between_tokens[row]:
                    ran = sum(e + 1 for e in sequence.extra_steps)
                    assert int(engine.cache.lengths[row]) == ran
    finally:
        hook.remove()
    slots = sum(e + 1 for s in sequences for e in s.extra_steps)
    assert sum(seen) == engine.slot_rows == slots
    if model.prunable:
        assert slots < sum(len(s.extra_steps) for s in sequences) * 3  # tau 0.3 pruned some slots


@pytest.mark.parametrize("name", ["ponderlm2", "ponderlm3", "halting"])
def test_exact_scoring_is_the_sum_of_per_token_decode_log_probabilities(name):
    model = make(name)
    tokens = torch.randint(0, VOCAB, (45,))

    class Split:  # the two calls eval_batches makes on a split
        def __len__(self):
            return len(tokens)

        def read(self, start, length):
            return tokens[start:start + length].numpy()

    tau = 0.3 if model.prunable else None
    measured = evaluate_model(model, Split(), tau=tau, scoring="exact")
    # Each window alone through a batch-1 engine (the last one ragged): log p of the next token after every token.
    seq, total, nll = model.config.data.seq_len, len(tokens) - 1, 0.0
    for start in range(0, total, seq):
        window = tokens[start: start + min(seq, total - start) + 1]
        sequence = Engine(model, max_batch=1).run([Request(window[:-1].tolist(), tau=tau, keep_logits=True)])[0]
        nll -= F.log_softmax(torch.stack(sequence.logits), -1).gather(1, window[1:, None]).sum().item()
    assert measured["tokens"] == total
    assert measured["loss"] == pytest.approx(nll / total, rel=1e-5)


@pytest.mark.parametrize("name", ["ponderlm2", "ponderlm3"])
def test_jacobi_scoring_agrees_within_its_error_and_converges_with_more_passes(name):
    model = make(name)
    ids = torch.randint(0, VOCAB, (2, 10))
    exact, exact_steps = score(model, ids, 0.3 if model.prunable else None, scoring="exact")
    errors = []
    for passes in (0, 2, 8, 30):  # (K + 1) T = 30 passes reach the fixed point
        model.config.ponder.eval_refine_passes = passes
        jacobi, _ = score(model, ids, 0.3 if model.prunable else None, scoring="jacobi")
        errors.append((jacobi - exact).abs().max().item())
    assert errors[-1] < 1e-4 and errors[0] > errors[-1] and errors == sorted(errors, reverse=True)


def test_each_request_prunes_at_its_own_tau():
    model = make("ponderlm3")
    prompt = list(range(1, 12))
    alone = {tau: Engine(model, 1).run([Request(prompt, tau=tau)])[0].extra_steps for tau in (0.0, 0.5, 0.99)}
    together = Engine(model, 3).run([Request(prompt, tau=tau) for tau in (0.0, 0.5, 0.99)])
    assert [s.extra_steps for s in together] == list(alone.values())
    assert set(alone[0.0]) == {2} and sum(alone[0.99]) < sum(alone[0.5]) <= sum(alone[0.0])


def test_sampling_is_per_request_and_seeded():
    model = make("ponderlm3")

    def sampled(seed, batch):
        requests = [Request([3, 4, 5], 12, Sampling(temperature=1.0, seed=seed))] + \
            [Request([9] * (n + 1), 12, Sampling(temperature=1.0, seed=99)) for n in range(batch - 1)]
        return Engine(model, batch).run(requests)[0].tokens

    assert sampled(1, 1) == sampled(1, 4)  # the same tokens whatever shares the batch
    assert any(sampled(seed, 1) != sampled(1, 1) for seed in (2, 3, 4))


def test_a_cancelled_sequence_frees_its_row_for_the_next():
    model = make("ponderlm2")
    engine = Engine(model, max_batch=1)
    first = engine.add(Request([1, 2, 3], max_new_tokens=20))
    second = engine.add(Request([4, 5], max_new_tokens=2))
    for _ in range(5):
        engine.step()
    engine.cancel(first)
    assert first.finish_reason == "stop" and engine.rows == []
    list(engine.stream())
    assert second.finish_reason == "length" and len(second.tokens) == 2
    alone = Engine(model, max_batch=1).run([Request([4, 5], max_new_tokens=2)])[0]
    assert second.tokens == alone.tokens


def test_bad_requests_are_refused_with_a_reason():
    model = make("ponderlm3")
    engine = Engine(model, max_batch=2, max_tokens=8)
    with pytest.raises(PonderError, match="at least one prompt token"):
        engine.add(Request([]))
    with pytest.raises(PonderError, match="exceed the engine's 8 tokens"):
        engine.add(Request([1] * 6, max_new_tokens=3))
    with pytest.raises(PonderError, match=r"token ids must lie in \[0, 53\)"):
        engine.add(Request([1, VOCAB]))
    with pytest.raises(PonderError, match="--tau applies to methods that prune"):
        Engine(make("vanilla")).add(Request([1], tau=0.5))
    assert not engine.busy



@pytest.mark.parametrize("name", ["vanilla", "ponderlm3"])
def test_logprobs_of_prompt_and_generated_tokens_equal_the_scored_logits(name):
    """What an echo request with logprobs reports: log p of every next token, prompt and generated, and the top ones."""
    model = make(name)
    tau = 0.3 if model.prunable else None
    prompt = [5, 9, 2, 31, 7]
    sequence = Engine(model, 2).run([Request(prompt, 4, tau=tau, logprobs=3)])[0]
    text = torch.tensor([prompt + sequence.tokens[:-1]])
    log_probs = F.log_softmax(score(model, text, tau, "exact")[0][0].float(), -1)
    following = prompt[1:] + sequence.tokens
    assert len(sequence.token_logprobs) == len(following) == len(sequence.top_logprobs)
    expected = log_probs.gather(1, torch.tensor(following)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(sequence.token_logprobs), expected, rtol=1e-5, atol=1e-5)
    for top, row in zip(sequence.top_logprobs, log_probs):
        assert [i for i, _ in top] == row.topk(3).indices.tolist()
    greedy = [top[0][0] for top in sequence.top_logprobs[len(prompt) - 1:]]
    assert greedy == sequence.tokens  # greedy decoding samples the most likely token


def test_the_command_line_offers_the_engines_scorings():
    from ponderlm import cli, engine

    assert cli.SCORINGS == engine.SCORINGS
