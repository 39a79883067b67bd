"""The inference engine: many sequences decoded together, one slot per sequence per step (docs/design.md §9).

Each step, every sequence in the batch runs the next slot it needs: its next token's own slot, or the next extra
step of the token in flight (a latent slot, a pass, a recursion). Every slot runs the same layer stack, so rows in
different phases share one forward call; each row brings its own input, RoPE position, cache length and key bias.
A method says what a row's next slot is and what a finished token's output is (`DecodeState`); the engine knows
no method names. A token that needs fewer extra steps simply finishes sooner: a pruned slot takes neither a row of
the forward call nor a cache position, and the row moves on to its next token.

Sequences join and leave at every step (continuous batching). The rows in use are always 0..n-1: a finished
sequence's row is refilled by the last row. Methods whose prompt slots can run in parallel exactly
(`parallel_prefill`) fill a new row's cache from the whole prompt in one call; the others feed it slot by slot.

`Engine` is the loop (add requests, `step`, read results); `score` is teacher-forced decoding of whole windows
(exact scoring for the latent methods, whose parallel forward is a Jacobi approximation).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from ponderlm.schema import check_tau
from ponderlm.errors import PonderError
from ponderlm.kvcache import KVCache
from ponderlm.machine import autocast
from ponderlm.methods.base import Inspection


@dataclasses.dataclass
class Sampling:
    """How a request picks its next token: temperature 0 is greedy; seeded per request, so a sampled continuation
    does not depend on which other requests share its batch."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflow; such a temperature is greedy anyway

    def __post_init__(self):
        if self.temperature != 0 and not self.MIN_TEMPERATURE <= self.temperature < math.inf:
            raise PonderError(f"temperature {self.temperature:g}: give 0 (greedy) or a value of at least "
                              f"{self.MIN_TEMPERATURE:g}")
        if self.top_k < 0:
            raise PonderError(f"top_k {self.top_k}: give 0 (every token) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise PonderError(f"top_p {self.top_p:g}: give a probability mass in (0, 1]")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float().cpu() / temperature  # the generator lives on the CPU
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclasses.dataclass
class Request:
    """One sequence for the engine: a prompt, then up to max_new_tokens generated tokens.

    stop_ids: generation ends after one of these is sampled (it is kept in `tokens`, finish_reason "stop").
    tau: the pruning threshold of this request (None: the run's); methods that do not prune ignore it.
    keep_logits: keep the logits after every token fed (teacher-forced scoring; float32 on the CPU).
    logprobs: record the log-probability of every next token (the prompt's from its second token on, then each
        generated one) and, if > 0, the `logprobs` most likely tokens with theirs.
    """

    prompt: list[int]
    max_new_tokens: int = 0
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    stop_ids: tuple[int, ...] = ()
    tau: float | None = None
    keep_logits: bool = False
    logprobs: int | None = None


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request in the engine, and its results as they come."""

    id: int
    request: Request
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated tokens
    extra_steps: list[int] = dataclasses.field(default_factory=list)  # per token fed: prompt, then generated
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)  # after each token fed, if keep_logits
    expected_extra_steps: list[float] = dataclasses.field(default_factory=list)  # per token fed, if keep_logits
    token_logprobs: list[float] = dataclasses.field(default_factory=list)  # of each next token, if logprobs
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # (id, logprob), best first
    finish_reason: str | None = None  # "length", "stop" (a stop id, or cancelled) once done
    fed: int = 0  # tokens started so far
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def observed(self) -> bool:
        """Does this request read the logits after every token, not only where it samples?"""
        return self.request.keep_logits or self.request.logprobs is not None

    def observe(self, logits: torch.Tensor, next_token: int | None) -> None:
        """The logits (V,) after a token fed, and the token that came next (None: the sequence ends here)."""
        if self.request.keep_logits:
            self.logits.append(logits.cpu())
        if self.request.logprobs is not None and next_token is not None:
            log_probs = logits.log_softmax(-1)
            self.token_logprobs.append(log_probs[next_token].item())
            if self.request.logprobs > 0:
                values, ids = log_probs.topk(min(self.request.logprobs, len(log_probs)))
                self.top_logprobs.append(list(zip(ids.tolist(), values.tolist())))

    def next_token(self) -> int:
        prompt = self.request.prompt
        return prompt[self.fed] if self.fed < len(prompt) else self.tokens[self.fed - len(prompt)]


class Engine:
    """Continuous batching of requests over one model.

    max_batch: rows decoded together. max_tokens: the longest sequence (prompt + new tokens) a request may have;
    the model's context (Config.context) by default. The KV cache holds max_batch x max_tokens x slots-per-token slots.
    prefill: fill new rows from their whole prompt at once where the method can (False: slot by slot, as tests of
    the step path want).
    """

    def __init__(self, model, max_batch: int = 32, max_tokens: int | None = None, prefill: bool = True):
        self.model = model.eval()
        self.prefill = prefill and model.parallel_prefill
        self.config = model.config
        self.max_batch = max_batch
        self.max_tokens = max_tokens or self.config.context
        weight = model.backbone.lm_head.weight
        self.device = weight.device
        self.autocast = lambda: autocast(self.config, self.device.type)
        dtype = torch.bfloat16 if isinstance(self.autocast(), torch.autocast) else weight.dtype
        self.cache = KVCache(self.config.model, max_batch, self.max_tokens * model.slots_per_token, dtype, self.device)
        self.state = model.decode_state(max_batch)
        self.positions = torch.full((max_batch,), -1, dtype=torch.long, device=self.device)
        self.between_tokens = torch.ones(max_batch, dtype=torch.bool, device=self.device)
        self.rows: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._next_id = 0
        self.slot_rows = 0  # rows the layer stack has run, prefill included: what the compute cost
        self.steps = 0

    # ----- requests -----

    def add(self, request: Request) -> Sequence:
        """Queue a request; it joins the batch at the next step with a free row."""
        self.check(request)
        sequence = Sequence(self._next_id, request)
        if request.sampling.temperature > 0:
            sequence.generator = torch.Generator().manual_seed(request.sampling.seed)
        self._next_id += 1
        self.waiting.append(sequence)
        return sequence

    def check(self, request: Request) -> None:
        """Refuse a request this engine cannot run, with the reason (reads no state: any thread may call it)."""
        prompt = request.prompt
        if not prompt:
            raise PonderError("a request needs at least one prompt token (start a document with the EOS token)")
        if len(prompt) + request.max_new_tokens > self.max_tokens:
            raise PonderError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceed "
                              f"the engine's {self.max_tokens} tokens per sequence (the model's context)")
        vocab = self.config.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise PonderError(f"prompt token ids must lie in [0, {vocab}) for this model")
        if request.max_new_tokens < 0:
            raise PonderError(f"max_new_tokens must be >= 0, not {request.max_new_tokens}")
        if request.tau is not None:
            self.model.check_tau_applies(request.tau)
            check_tau(request.tau, "tau")

    def cancel(self, sequence: Sequence, reason: str = "stop") -> None:
        """End a sequence now (a stop string the caller found, a client gone): its row is freed for others."""
        if sequence.done:
            return
        sequence.finish_reason = reason
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        else:
            self._retire(next(row for row, s in enumerate(self.rows) if s is sequence))

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def run(self, requests: Iterable[Request]) -> list[Sequence]:
        """Every request to completion; results in request order."""
        sequences = [self.add(request) for request in requests]
        for _ in self.stream():
            pass
        return sequences

    def stream(self) -> Iterator[Sequence]:
        """Step until no request is left, yielding each sequence as it finishes."""
        while self.busy:
            yield from (sequence for sequence in self.step() if sequence.done)

    # ----- the loop -----

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """Admit waiting requests, run one slot for every row; the sequences that got a new token or finished."""
        events: list[Sequence] = []
        with self.autocast():
            self._admit(events)
            rows = len(self.rows)
            if rows == 0:
                return events
            starting = self.between_tokens[:rows].clone()
            token_ids = [0] * rows  # rows that go on with a token in flight embed a placeholder
            for row, starts in enumerate(starting.tolist()):
                if starts:
                    sequence = self.rows[row]
                    token_ids[row] = sequence.next_token()
                    sequence.fed += 1
            self.positions[:rows] += starting.long()
            token_embeds = self.model.backbone.embed(torch.tensor(token_ids, device=self.device))
            inputs, group, bias = self.state.next_slots(rows, starting, token_embeds)
            view = self.cache.step(rows, group, bias)
            hidden = self.model.backbone.hidden_states(inputs[:, None], self.positions[:rows, None], cache=view,
                                                       final_norm=False)[:, 0]
            view.commit()
            self.slot_rows += rows
            self.steps += 1
            finished, outputs, extra_steps = self.state.absorb(hidden)
            self.between_tokens[:rows] = finished
            done_rows = finished.nonzero()[:, 0].tolist()
            if done_rows:
                self._finish_tokens(done_rows, outputs[done_rows], extra_steps[done_rows].tolist(), events)
        return events

    def _admit(self, events: list[Sequence]) -> None:
        first = len(self.rows)
        while self.waiting and len(self.rows) < self.max_batch:
            sequence = self.waiting.popleft()
            row = len(self.rows)
            self.rows.append(sequence)
            self.state.set_tau(row, self.model.resolve_tau(sequence.request.tau))
            self.positions[row] = -1
            self.between_tokens[row] = True
        if self.prefill and len(self.rows) > first:
            self._prefill(first, events)

    def _prefill(self, first: int, events: list[Sequence]) -> None:
        """The whole prompts of rows first.. in one call per pass; each prompt's last token yields the first logits."""
        sequences = self.rows[first:]
        lengths = [len(s.request.prompt) for s in sequences]
        ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
        for index, sequence in enumerate(sequences):
            ids[index, : lengths[index]] = torch.tensor(sequence.request.prompt)
            sequence.fed = lengths[index]
        view = self.cache.prefill(first, torch.tensor(lengths, device=self.device))
        states, extra_steps = self.model.prefill(ids.to(self.device), view)
        self.slot_rows += sum(lengths) * self.model.slots_per_token
        self.positions[first: first + len(sequences)] = torch.tensor(lengths, device=self.device) - 1
        rows, outputs, extra_lists = [], [], []
        for index, sequence in enumerate(sequences):
            length = lengths[index]
            prompt = sequence.request.prompt
            sequence.extra_steps.extend(extra_steps[index, : length - 1].tolist())
            if sequence.request.keep_logits:  # the prefill methods' allocation is the steps they run
                sequence.expected_extra_steps.extend(extra_steps[index, : length - 1].float().tolist())
            if sequence.observed and length > 1:
                for position, logits in enumerate(self.model.logits(states[index, : length - 1]).float()):
                    sequence.observe(logits, prompt[position + 1])
            rows.append(first + index)
            outputs.append(states[index, length - 1])
            extra_lists.append(int(extra_steps[index, length - 1]))
        self._finish_tokens(rows, torch.stack(outputs), extra_lists, events)

    def _finish_tokens(self, rows: list[int], outputs: torch.Tensor, extra_steps: list[int],
                       events: list[Sequence]) -> None:
        """Rows whose token just finished: record it; after the last known token, sample the next or stop."""
        need_logits = []
        expected = None
        for index, row in enumerate(rows):
            sequence = self.rows[row]
            sequence.extra_steps.append(extra_steps[index])
            if sequence.request.keep_logits:  # scoring and analysis read the soft allocation too
                if expected is None:
                    soft = self.state.expected_extra_steps(rows)
                    expected = soft.tolist() if soft is not None else [float(e) for e in extra_steps]
                sequence.expected_extra_steps.append(expected[index])
            if sequence.observed or sequence.fed >= len(sequence.request.prompt):
                need_logits.append(index)
        if not need_logits:
            return
        logits = self.model.logits(outputs[need_logits]).float()
        greedy = logits.argmax(-1).tolist()
        retired = []
        for position, index in enumerate(need_logits):
            row = rows[index]
            sequence = self.rows[row]
            request = sequence.request
            if sequence.fed < len(request.prompt):  # more prompt to feed
                sequence.observe(logits[position], request.prompt[sequence.fed])
                continue
            token = None
            if len(sequence.tokens) >= request.max_new_tokens:
                sequence.finish_reason = "length"
            else:
                sampling = request.sampling
                token = greedy[position] if sampling.temperature <= 0 else int(sample_next(
                    logits[position: position + 1], sampling.temperature, sampling.top_k, sampling.top_p,
                    sequence.generator))
                sequence.tokens.append(token)
                if token in request.stop_ids:
                    sequence.finish_reason = "stop"
                elif len(sequence.tokens) >= request.max_new_tokens:
                    sequence.finish_reason = "length"
            sequence.observe(logits[position], token)
            events.append(sequence)
            if sequence.done:
                retired.append(row)
        for row in sorted(retired, reverse=True):
            self._retire(row)

    def _retire(self, row: int) -> None:
        """Free a finished row: the last row moves into it, so the rows in use stay 0..n-1."""
        last = len(self.rows) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.state.move_row(last, row)
            self.positions[row] = self.positions[last]
            self.between_tokens[row] = self.between_tokens[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self.cache.clear_row(last)


SCORINGS = ("exact", "jacobi")


def scores_in_parallel(model, scoring: str) -> bool:
    """Does `scoring` read the model's parallel forward (Jacobi, or a method whose parallel forward is exact), rather
    than decode through the engine?"""
    if scoring not in SCORINGS:
        raise PonderError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
    return scoring == "jacobi" or model.exact_parallel


@torch.no_grad()
def score(model, input_ids: torch.Tensor, tau: float | None = None, scoring: str = "exact", max_batch: int = 32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) after every token of windows (B, T) and the extra steps each token ran (B, T).

    scoring "exact": the sequential recurrence. Where a method's parallel forward already equals it
    (`exact_parallel`) that forward runs; otherwise teacher-forced decoding through the engine. "jacobi": the
    parallel Jacobi forward of the latent methods (`ponder.eval_refine_passes` refinement passes), approximate.
    """
    if scores_in_parallel(model, scoring):
        return model.infer(input_ids, tau)
    return teacher_forced(model, input_ids, tau, max_batch)


@torch.no_grad()
def inspect(model, input_ids: torch.Tensor, tau: float | None = None, scoring: str = "exact") -> Inspection:
    """What `analyze` reads of windows (B, T): logits, extra steps run and the soft allocation, by `score`'s rules."""
    if scores_in_parallel(model, scoring):
        return model.inspect(input_ids, tau)
    sequences = _teacher_forced_sequences(model, input_ids, tau, len(input_ids), True)
    logits, extra_steps = _stack(sequences, input_ids.device)
    expected = torch.tensor([s.expected_extra_steps for s in sequences], device=input_ids.device)
    return Inspection(logits, extra_steps, expected)


@torch.no_grad()
def teacher_forced(model, input_ids: torch.Tensor, tau: float | None = None, max_batch: int = 32,
                   prefill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and extra steps (B, T) of windows (B, T) decoded through the engine, each window one
    sequence (prefill=False: slot by slot even where the method could prefill)."""
    return _stack(_teacher_forced_sequences(model, input_ids, tau, max_batch, prefill), input_ids.device)


def _teacher_forced_sequences(model, input_ids, tau, max_batch, prefill) -> list[Sequence]:
    engine = Engine(model, max_batch=min(max_batch, len(input_ids)), max_tokens=input_ids.shape[1], prefill=prefill)
    return engine.run([Request(row, tau=tau, keep_logits=True) for row in input_ids.tolist()])


def _stack(sequences: list[Sequence], device) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.stack([torch.stack(s.logits) for s in sequences])
    extra_steps = torch.tensor([s.extra_steps for s in sequences])
    return logits.to(device), extra_steps.to(device)
