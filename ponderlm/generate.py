"""`ponderlm generate`: sampling (greedy, temperature, top-k, top-p) through the engine, one prompt streamed or
many prompts batched together (`--prompts-file`).

Prompt i of a batch samples with seed `seed + i`, so its text does not depend on which prompts share its batch.
A prompt reads special tokens written in it as those tokens; with `chat`, it is a user's message put into the
model's chat template. Generation stops at any of the model's stop tokens (`ModelTokenizer.stop_ids`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from ponderlm.data import ModelTokenizer
from ponderlm.engine import Engine, Request, Sampling, sample_next
from ponderlm.errors import PonderError

__all__ = ["Generated", "TextStream", "generate", "generate_many", "prompt_ids", "sample_next"]


@dataclasses.dataclass
class Generated:
    prompt: str
    text: str
    extra_steps: list[int]  # the extra steps the model ran before emitting each generated token
    finish_reason: str  # "stop" (EOS) or "length"


def check_max_new_tokens(max_new_tokens: int, context: int) -> None:
    if not 0 <= max_new_tokens < context:
        raise PonderError(f"--max-new-tokens must be between 0 and {context - 1}: the model's context is {context} "
                          "tokens, prompt included")


def check_prompt(prompt: str, where: str = "the prompt") -> str:
    """A prompt that is text: one read with undecodable bytes (a shell's or a file's) holds lone surrogates."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise PonderError(f"{where} is not valid UTF-8 text; give it in UTF-8") from None
    return prompt


def prompt_ids(tokenizer: ModelTokenizer, prompt: str, max_new_tokens: int, context: int,
               chat: bool = False) -> list[int]:
    """The prompt's token ids (chat: the user's message in the chat template), cut to its last tokens where it and
    max_new_tokens would not fit the context."""
    check_max_new_tokens(max_new_tokens, context)
    if chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode_prompt(prompt) or [tokenizer.document_id]  # an empty prompt starts a new document
    if len(ids) + max_new_tokens > context:
        keep = context - max_new_tokens
        print(f"ponderlm: notice: the prompt has {len(ids)} tokens; only its last {keep} are used, so that it and "
              f"{max_new_tokens} new tokens fit the model's context of {context}", file=sys.stderr)
        ids = ids[-keep:]
    return ids


class TextStream:
    """The text of a growing list of generated tokens, cut at the first stop string, and the new piece of it that
    is safe to stream: never the start of a stop string, nor a character whose UTF-8 bytes are not all there yet
    (a byte-level BPE token may split one). A trailing stop token (EOS) is not text."""

    def __init__(self, tokenizer: ModelTokenizer, stops: list[str] = (), stop_ids: tuple[int, ...] = ()):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, [s for s in stops if s], stop_ids
        self.text, self.stopped, self.sent = "", False, 0

    def update(self, tokens: list[int], final: bool) -> str:
        """The new text to send, given the tokens so far (final: the sequence ended)."""
        ids = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
        text = self.tokenizer.decode(ids)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            text, self.stopped, final = text[: min(cuts)], True, True
        self.text = text
        ready = len(text) if final else min(len(text) - max([len(s) - 1 for s in self.stops] + [0]),
                                            len(text.rstrip("\ufffd")))
        if ready <= self.sent:
            return ""
        piece, self.sent = text[self.sent: ready], ready
        return piece


def _requests(model, tokenizer: ModelTokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, seed: int, tau: float | None, chat: bool) -> list[Request]:
    context = model.config.context
    return [Request(prompt_ids(tokenizer, prompt, max_new_tokens, context, chat), max_new_tokens,
                    Sampling(temperature, top_k, top_p, seed + index), stop_ids=tokenizer.stop_ids, tau=tau)
            for index, prompt in enumerate(prompts)]


def _longest(*requests: Request) -> int:
    """The KV cache length these requests need: less than the model's context (8,192 for some imports) x rows."""
    return max(len(request.prompt) + request.max_new_tokens for request in requests)


def _result(tokenizer: ModelTokenizer, prompt: str, sequence) -> Generated:
    ended = sequence.tokens and sequence.tokens[-1] in sequence.request.stop_ids
    new_ids = sequence.tokens[:-1] if ended else sequence.tokens
    # The extra steps of token i + 1 are those its predecessor ran: the first comes from the last prompt token.
    fed = sequence.extra_steps[len(sequence.request.prompt) - 1:]
    return Generated(prompt, tokenizer.decode(new_ids), fed[: len(new_ids)], sequence.finish_reason)


def generate(model, tokenizer: ModelTokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, tau: float | None = None,
             on_text: Callable[[str], None] | None = None, extra_steps_per_token: list[int] | None = None,
             chat: bool = False) -> str:
    """Continue `prompt` (chat: answer it as a user's message) until a stop token or max_new_tokens; `on_text`
    receives each new piece of text once it is known.

    extra_steps_per_token, if given, receives the extra steps the model ran before emitting each generated token.
    """
    request, = _requests(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, top_p, seed, tau, chat)
    engine = Engine(model, max_batch=1, max_tokens=_longest(request))
    sequence = engine.add(request)
    stream = TextStream(tokenizer, stop_ids=request.stop_ids)
    while engine.busy:
        engine.step()
        if on_text is not None:
            piece = stream.update(sequence.tokens, final=sequence.done)
            if piece:
                on_text(piece)
    result = _result(tokenizer, prompt, sequence)
    if extra_steps_per_token is not None:
        extra_steps_per_token.extend(result.extra_steps)
    return result.text


def generate_many(model, tokenizer: ModelTokenizer, prompts: list[str], max_new_tokens: int = 100,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  tau: float | None = None, max_batch: int = 32,
                  on_result: Callable[[int, Generated], None] | None = None, chat: bool = False) -> list[Generated]:
    """Continue every prompt (chat: answer each as a user's message), `max_batch` at a time with continuous
    batching; results in prompt order. on_result(index, result) is called as each prompt finishes."""
    requests = _requests(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, tau, chat)
    engine = Engine(model, max_batch=max_batch, max_tokens=_longest(*requests))
    sequences = [engine.add(request) for request in requests]
    index_of = {sequence.id: index for index, sequence in enumerate(sequences)}
    for sequence in engine.stream():
        if on_result is not None:
            index = index_of[sequence.id]
            on_result(index, _result(tokenizer, prompts[index], sequence))
    return [_result(tokenizer, prompt, sequence) for prompt, sequence in zip(prompts, sequences)]
