"""The lm-eval adapter: scores equal direct computations from the model; rolling scores equal `ponderlm eval`."""

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from ponderlm.config import load_config
from ponderlm.data import EOS_TOKEN, load_tokenizer
from ponderlm.evaluate import evaluate_model
from ponderlm.generate import generate
from ponderlm.harness import PonderLMHarness
from ponderlm.methods import build_model

TEXT = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
        "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
        "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure.")


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def make(method, tokenizer, *overrides):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={tokenizer.get_vocab_size()}"],
                         shared=["ponder.extra_steps=2", *overrides])
    model = build_model(config).eval()
    if method == "ponderlm3":  # a decisive router, so tokens keep different numbers of slots
        with torch.no_grad():
            model.router.weight.normal_(0, 0.5)
            model.router.bias.normal_(0, 1)
    return model


def request(kind, args, task="demo"):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, 0, 1))


@pytest.mark.parametrize("method", ["vanilla", "loop", "ponderlm3"])
def test_loglikelihood_equals_a_direct_computation_from_the_logits(method, tokenizer):
    # With (K + 1) T refinement passes the parallel forward is the exact recurrence the harness decodes.
    model = make(method, tokenizer, "ponder.tau=0.2", "ponder.eval_refine_passes=96")
    harness = PonderLMHarness(model, tokenizer, batch_size=2, progress=False)
    pairs = [("Four score and seven", " years ago"), ("Now we are", " engaged in a great civil war"),
             ("", "Liberty"), ("testing whether that nation ", "can long endure.")]
    results = harness.loglikelihood([request("loglikelihood", p) for p in pairs])
    eos = tokenizer.token_to_id(EOS_TOKEN)
    for (context, continuation), (log_prob, greedy) in zip(pairs, results):
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        ids = [eos] + tokenizer.encode(continuation).ids if not context else tokenizer.encode(context + continuation).ids
        n = len(ids) - (1 if not context else len(tokenizer.encode(context).ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]  # forward = the inference path at the run's tau
        scored = F.log_softmax(logits.float(), -1)[-n:]
        targets = torch.tensor(ids[-n:])
        assert log_prob == pytest.approx(scored.gather(-1, targets[:, None]).sum().item(), rel=1e-5, abs=1e-5)
        assert greedy == bool((scored.argmax(-1) == targets).all())
    compute = harness.compute_summary()["demo"]
    if method == "ponderlm3":
        assert 0 < compute["mean_extra_steps"] < 2  # pruning at tau = 0.2 kept some slots, not all
    else:
        assert compute["mean_extra_steps"] == (2 if method == "loop" else 0)
    assert compute["inference_flops_per_token"] > 0


class TokenList:
    """The two calls `eval_batches` makes on a split, over an in-memory token list."""

    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens).numpy()

    def __len__(self):
        return len(self.tokens)

    def read(self, start, length):
        return self.tokens[start:start + length]


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_rolling_loglikelihood_agrees_with_ponderlm_eval_on_the_same_text(method, tokenizer):
    model = make(method, tokenizer, "ponder.tau=0.2")
    # A text whose token count splits into whole windows, so both walk the same windows (several of them).
    text = next(TEXT[:end] for end in range(len(TEXT), 0, -1) if len(tokenizer.encode(TEXT[:end]).ids) % 4 == 0)
    tokens = tokenizer.encode(text).ids
    window = len(tokens) // 4
    model.config.data.seq_len = window
    harness = PonderLMHarness(model, tokenizer, progress=False)
    harness.max_length = window
    rolling = harness.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])[0]
    measured = evaluate_model(model, TokenList([tokenizer.token_to_id(EOS_TOKEN)] + tokens))
    assert measured["tokens"] == len(tokens)
    assert -rolling / len(tokens) == pytest.approx(measured["loss"], rel=1e-5)
    assert harness.compute_summary()["demo"]["mean_extra_steps"] == pytest.approx(measured["mean_extra_steps"])


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(method, tokenizer):
    model = make(method, tokenizer)
    harness = PonderLMHarness(model, tokenizer, progress=False)
    full = generate(model, tokenizer, "Four score and", max_new_tokens=12)
    stop = full[3:5] if len(full) > 5 else "\x00"
    (out,) = harness.generate_until([request("generate_until", ("Four score and", {"until": [stop],
                                                                                   "max_gen_toks": 12}))])
    assert out == full.split(stop)[0]


def test_generate_until_runs_at_the_harness_tau(tokenizer):
    model = make("ponderlm3", tokenizer)
    prompt, options = "Four score and", {"until": ["\x00"], "max_gen_toks": 8}
    outputs, steps = {}, {}
    for tau in (0.0, 0.99):  # neither is the run's tau (1e-4)
        harness = PonderLMHarness(model, tokenizer, tau=tau, progress=False)
        (outputs[tau],) = harness.generate_until([request("generate_until", (prompt, options))])
        steps[tau] = harness.compute_summary()["demo"]["mean_extra_steps"]
        assert outputs[tau] == generate(model, tokenizer, prompt, max_new_tokens=8, tau=tau)
    assert steps[0.0] == 2 and steps[0.99] < 2


def test_generate_until_without_stop_strings_runs_to_eos_or_its_length(tokenizer):
    """The default stop is the EOS token's text, which decodes to nothing: it must not stop (or split) anything."""
    model = make("vanilla", tokenizer)
    harness = PonderLMHarness(model, tokenizer, progress=False)
    (out,) = harness.generate_until([request("generate_until", ("Four score and", {"max_gen_toks": 10}))])
    assert out == generate(model, tokenizer, "Four score and", max_new_tokens=10) and out
