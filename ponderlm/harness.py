"""An lm-eval `LM` for every ponderlm method, on the inference path (prunable methods: hard pruning at tau).

Scoring runs the parallel inference forward (`model.infer`), batched and right-padded, which is causal, so the
padding never changes a real position. Generation runs the KV-cached decoder. Beside lm-eval's metrics the adapter
counts, per task, the tokens it ran, the latent steps they used and their inference FLOPs (the same analytic
count as `ponderlm eval`), because a latent-thought model's accuracy means little without its compute.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from tqdm import tqdm

from ponderlm.data import end_of_document_id
from ponderlm.generate import continuation, sample_next


class PonderLMHarness(LM):
    def __init__(self, model, tokenizer: Tokenizer, tau: float | None = None, batch_size: int = 16,
                 progress: bool = True):
        super().__init__()
        self.model, self.tokenizer, self.tau, self.batch_size = model.eval(), tokenizer, tau, batch_size
        self.config = model.config
        self.max_length = self.config.data.seq_len  # the context the model was trained on
        self.eos_id = end_of_document_id(tokenizer)
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

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], tasks: list[str]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) for token-id pairs."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="score", unit="batch", disable=not self.progress, dynamic_ncols=True):
            rows = []
            for i in batch:
                context, continuation = pairs[i]
                continuation = continuation[-self.max_length:]
                window = (context + continuation)[-(self.max_length + 1):]  # keep the most recent context
                rows.append((window[:-1], len(continuation)))
            width = max(len(ids) for ids, _ in rows)
            inputs = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
            for r, (ids, _) in enumerate(rows):
                inputs[r, : len(ids)] = torch.tensor(ids)
            with self.config.autocast(self.device.type):
                logits, extra_steps = self.model.infer(inputs.to(self.device), self.tau)
            log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
            for r, (i, (ids, n)) in enumerate(zip(batch, rows)):
                length = len(ids)
                targets = torch.tensor(pairs[i][1][-n:])
                scored = log_probs[r, length - n: length]
                results[i] = (scored.gather(-1, targets[:, None]).sum().item(),
                              bool((scored.argmax(-1) == targets).all()))
                self._record(tasks[i], extra_steps[r, :length])
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
        """Greedy (or sampled, if asked) continuation of each context until a stop string or max_gen_toks."""
        outputs = []
        for request in tqdm(requests, desc="generate", unit="request", disable=not self.progress):
            context, options = request.args
            options = dict(options)
            until = options.pop("until", None) or [self.tokenizer.decode([self.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", 256))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            ids = (self._encode(context) or [self.eos_id])[-max(1, self.max_length - max_new):]
            extra_steps: list[torch.Tensor] = []
            new_ids: list[int] = []
            text = ""
            choose = partial(sample_next, temperature=temperature, top_k=0, top_p=1.0, generator=None)
            for token in continuation(self.model, ids, max_new, choose, self.tau, extra_steps):
                if token == self.eos_id:
                    break
                new_ids.append(token)
                text = self.tokenizer.decode(new_ids)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self._record(request.task_name, torch.stack(extra_steps)[:, 0])
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs
