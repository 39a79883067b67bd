"""An lm-eval `LM` for every ponderlm method, on the inference path (prunable methods: hard pruning at tau).

Scoring is exact (`ponderlm/engine.py`): methods whose parallel forward equals sequential decoding run it, batched and
right-padded (causal, so the padding never changes a real position); the latent methods, whose parallel forward is a
Jacobi approximation, are scored by teacher-forced decoding through the engine, every request its own sequence
(`scoring="jacobi"` keeps the parallel forward for them). Generation runs through the engine, batched.

Beside lm-eval's metrics the adapter counts, per task, the tokens it ran, the latent steps they used and their inference
FLOPs (the same analytic count as `ponderlm eval`), because a latent-thought model's accuracy means little without its
compute.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ponderlm.data import ModelTokenizer
from ponderlm.engine import Engine, Request, Sampling, score, scores_in_parallel
from ponderlm.generate import TextStream
from ponderlm.machine import autocast


class PonderLMHarness(LM):
    def __init__(self, model, tokenizer: ModelTokenizer, tau: float | None = None, batch_size: int = 16,
                 progress: bool = True, scoring: str = "exact"):
        super().__init__()
        self.decode_scoring = not scores_in_parallel(model, scoring)
        self.model, self.tokenizer, self.tau, self.batch_size = model.eval(), tokenizer, tau, batch_size
        self.scoring = scoring
        self.config = model.config
        self.max_length = self.config.context
        self.eos_id = tokenizer.document_id  # a document's start, as in training
        self._device = model.backbone.lm_head.weight.device  # read through LM.device
        self.progress = progress
        self.compute = defaultdict(lambda: {"tokens": 0, "extra_steps": 0, "flops": 0.0})

    def compute_summary(self) -> dict[str, dict[str, float]]:
        """Per task: tokens run through the model, mean extra (latent) steps and inference FLOPs per token."""
        return {task: {"tokens": c["tokens"], "mean_extra_steps": c["extra_steps"] / max(1, c["tokens"]),
                       "inference_flops_per_token": c["flops"] / max(1, c["tokens"])}
                for task, c in sorted(self.compute.items())}

    def _record(self, task: str, extra_steps: torch.Tensor) -> None:
        counts = self.compute[task]
        counts["tokens"] += extra_steps.numel()
        counts["extra_steps"] += int(extra_steps.sum())
        counts["flops"] += self.model.inference_flops(extra_steps.view(1, -1).cpu())

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Encode the whole string and split it where the context's tokens end, so the continuation is tokenized
        # as it would be in running text; trailing context spaces move to the continuation (as lm-eval's HF LM).
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces:] + continuation
        context_ids = self._encode(context) if context else [self.eos_id]  # empty context: start of a document
        whole = self._encode(context + continuation) if context else [self.eos_id] + self._encode(continuation)
        return context_ids, whole[len(context_ids):]

    # ----- scoring -----

    def _windows(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], int]]:
        """For each (context, continuation): the model's input (the most recent tokens that fit) and how many of
        its last positions predict the continuation."""
        rows = []
        for context, continuation in pairs:
            continuation = continuation[-self.max_length:]
            window = (context + continuation)[-(self.max_length + 1):]  # keep the most recent context
            rows.append((window[:-1], len(continuation)))
        return rows

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], tasks: list[str]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) for token-id pairs."""
        rows = self._windows(pairs)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)

        def record(i: int, log_probs: torch.Tensor, extra_steps: torch.Tensor) -> None:
            ids, n = rows[i]
            targets = torch.tensor(pairs[i][1][-n:])
            scored = log_probs[len(ids) - n: len(ids)]
            results[i] = (scored.gather(-1, targets[:, None]).sum().item(), bool((scored.argmax(-1) == targets).all()))
            self._record(tasks[i], extra_steps[: len(ids)])

        order = sorted(range(len(pairs)), key=lambda i: -len(rows[i][0]))
        bar = tqdm(total=len(pairs), desc="score", unit="request", disable=not self.progress, dynamic_ncols=True)
        if self.decode_scoring:  # every request its own sequence, continuously batched
            longest = max((len(row[0]) for row in rows), default=1)
            engine = Engine(self.model, max_batch=self.batch_size, max_tokens=longest)
            for i in order:
                engine.add(Request(rows[i][0], tau=self.tau, keep_logits=True))
            for sequence in engine.stream():  # a finished sequence's logits are read, then dropped
                i = order[sequence.id]
                record(i, F.log_softmax(torch.stack(sequence.logits), dim=-1), torch.tensor(sequence.extra_steps))
                bar.update()
        else:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(rows[i][0]) for i in batch)
                inputs = torch.full((len(batch), width), self.eos_id, dtype=torch.long)
                for r, i in enumerate(batch):
                    inputs[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
                with autocast(self.config, self.device.type):
                    logits, extra_steps = score(self.model, inputs.to(self.device), self.tau, self.scoring)
                log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
                for r, i in enumerate(batch):
                    record(i, log_probs[r], extra_steps[r].cpu())
                bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        results = self._score(pairs, [request.task_name for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-document log-likelihood: every token scored once, with up to max_length tokens of context."""
        pairs, owners, tasks = [], [], []
        for index, request in enumerate(requests):
            windows = get_rolling_token_windows(self._encode(request.args[0]), prefix_token=self.eos_id,
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
                tasks.append(request.task_name)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._score(pairs, tasks)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----- generation -----

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, if asked) continuation of each context until a stop string or max_gen_toks, all
        requests through one engine (continuously batched)."""
        queued, stops = [], []
        for request in requests:
            context, options = request.args
            options = dict(options)
            until = options.pop("until", None) or []  # the stop tokens end it anyway
            stops.append([until] if isinstance(until, str) else list(until))
            max_new = min(int(options.pop("max_gen_toks", 256)), self.max_length - 1)
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            ids = (self._encode(context) or [self.eos_id])[-(self.max_length - max_new):]
            queued.append(Request(ids, max_new, Sampling(temperature), stop_ids=self.tokenizer.stop_ids, tau=self.tau))
        # A KV cache as long as the longest request needs, not the model's whole context (8,192 for some imports).
        engine = Engine(self.model, max_batch=self.batch_size,
                        max_tokens=max((len(r.prompt) + r.max_new_tokens for r in queued), default=1))
        sequences = [engine.add(request) for request in queued]
        texts = [TextStream(self.tokenizer, until, self.tokenizer.stop_ids) for until in stops]
        bar = tqdm(total=len(sequences), desc="generate", unit="request", disable=not self.progress)
        while engine.busy:
            for sequence in engine.step():
                texts[sequence.id].update(sequence.tokens, sequence.done)
                if texts[sequence.id].stopped and not sequence.done:
                    engine.cancel(sequence)  # a stop string is complete: nothing after it is read
                if sequence.done:
                    bar.update()
        bar.close()
        for request, sequence, text in zip(requests, sequences, texts):
            self._record(request.task_name, torch.tensor(sequence.extra_steps))
            self.cache_hook.add_partial("generate_until", request.args, text.text)
        return [text.text for text in texts]
