"""`ponderlm eval`: loss, perplexity, pondering and inference FLOPs of a run on a split of its data.

Everything is measured on the inference path: for prunable methods the hard-pruned forward at tau, whose kept
extra steps per token also drive the FLOPs count; their soft (training-mask) loss is reported beside it.
`scoring` chooses how the latent methods' recurrence is computed (`ponderlm/engine.py`, `score`): "exact", by
teacher-forced decoding through the engine (the default), or "jacobi", by the parallel training-mode forward.
Validation during training calls the parallel forward (through the distributed wrapper).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ponderlm.batching import eval_batches
from ponderlm.schema import check_tau
from ponderlm.data import TokenShards
from ponderlm.engine import score
from ponderlm.errors import PonderError
from ponderlm.machine import autocast, machine, precision
from ponderlm.methods import Method
from ponderlm.rundir import RunDir


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows a float (a mean loss above 709 nats: a broken or untrained model)."""
    return math.exp(loss) if loss < 709 else math.inf


@torch.no_grad()
def evaluate_model(model: Method, shards: TokenShards, max_tokens: int | None = None, tau: float | None = None,
                   scoring: str = "exact") -> dict:
    """Mean next-token NLL (nats) over the first max_tokens of a split, with pondering statistics (scoring: see
    engine.score; training validates with the parallel forward, "jacobi", which FSDP2 gathers parameters for)."""
    config = model.config
    device = model.backbone.lm_head.weight.device
    was_training = model.training
    model.eval()
    nll, tokens, flops = 0.0, 0, 0.0
    histogram = torch.zeros(model.max_extra_steps + 1, dtype=torch.long)
    # Without gradients a batch of ~16K tokens fits wherever a training micro-batch does, and amortises overhead.
    batch_size = max(config.train.micro_batch_size, 16384 // config.data.seq_len)
    for inputs, targets in eval_batches(shards, config.data.seq_len, batch_size, max_tokens):
        with autocast(config, device.type):
            logits, extra_steps = score(model, inputs.to(device), tau, scoring, max_batch=len(inputs))
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
        tokens += targets.numel()
        extra_steps = extra_steps.cpu()
        flops += model.inference_flops(extra_steps)
        histogram += torch.bincount(extra_steps.flatten(), minlength=len(histogram))[: len(histogram)]
    model.train(was_training)
    if tokens == 0:
        raise PonderError(f"nothing to evaluate: max_tokens={max_tokens}, split {shards.split!r} holds {len(shards)} "
                          f"tokens, and a window needs data.seq_len + 1 = {config.data.seq_len + 1}")
    extra_steps = (histogram * torch.arange(len(histogram))).sum().item()
    return {"loss": nll / tokens, "tokens": tokens, "mean_extra_steps": extra_steps / tokens,
            "extra_steps_histogram": histogram.tolist(), "inference_flops_per_token": flops / tokens}


def evaluate_run(run_dir: str | Path, split: str = "val", max_tokens: int | None = None,
                 data_path: str | Path | None = None, tau: float | None = None, with_soft: bool = True,
                 scoring: str = "exact") -> dict:
    """The `ponderlm eval` JSON. with_soft=False skips a prunable method's soft loss (it does not depend on tau)."""
    check_tau(tau)
    model, _, shards, metadata = RunDir(run_dir).load_with_data(split, data_path)
    model.check_tau_applies(tau)
    config = model.config
    measured = evaluate_model(model, shards, max_tokens, tau, scoring=scoring)
    device = model.backbone.lm_head.weight.device
    result = {"method": config.method, "split": split, "scoring": scoring, "precision": precision(config, device.type),
              "loss": measured["loss"], "ppl": perplexity(measured["loss"]),
              "tokens": measured["tokens"], "mean_extra_steps": measured["mean_extra_steps"],
              "inference_flops_per_token": measured["inference_flops_per_token"]}
    if model.max_extra_steps:
        result["max_extra_steps"] = model.max_extra_steps
        result["extra_steps_histogram"] = measured["extra_steps_histogram"]
    if model.prunable:
        result["tau"] = model.resolve_tau(tau)
    if model.prunable and with_soft:
        soft = evaluate_model(model, shards, max_tokens, tau=0.0, scoring=scoring)["loss"]
        result.update(soft_loss=soft, soft_ppl=perplexity(soft), pruned_minus_soft=measured["loss"] - soft)
    result["machine"] = machine(device)
    words = metadata["splits"][split].get("words")
    if words and measured["tokens"] == len(shards) - 1:
        # Every token of the split (EOS included, standing in for PTB's <eos>) was scored once.
        result["word_ppl"] = perplexity(measured["loss"] * measured["tokens"] / words)
        result["words"] = words
    return result


def tau_table(run_dir: str | Path, taus: list[float], split: str = "val", max_tokens: int | None = None,
              data_path: str | Path | None = None, scoring: str = "exact") -> str:
    """The trade-off of a prunable run as a markdown table: perplexity, extra steps and FLOPs at each tau."""
    for tau in taus:
        check_tau(tau)
    model, _, shards, _ = RunDir(run_dir).load_with_data(split, data_path)
    if not model.prunable:
        raise PonderError(f"--taus needs a run of a prunable method; {run_dir} is {model.config.method}, whose "
                          "compute does not depend on tau")
    soft = evaluate_model(model, shards, max_tokens, tau=0.0, scoring=scoring)
    lines = [f"{model.config.method}, {split} split, {soft['tokens']:,} tokens, {scoring} scoring; soft "
             f"(training-mask) perplexity {perplexity(soft['loss']):.2f}",
             "tokens/s: tokens scored per second of wall-clock time on this machine, at each tau", "",
             "| tau | ppl | mean extra steps | inference FLOPs/token | tokens/s |", "|---|---|---|---|---|"]
    for tau in taus:
        start = time.perf_counter()
        measured = evaluate_model(model, shards, max_tokens, tau, scoring=scoring)
        seconds = time.perf_counter() - start
        lines.append(f"| {tau:g} | {perplexity(measured['loss']):.2f} | {measured['mean_extra_steps']:.3f} | "
                     f"{measured['inference_flops_per_token']:.3e} | {measured['tokens'] / seconds:,.0f} |")
    return "\n".join(lines)
