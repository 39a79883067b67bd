"""`ponderlm generate`: KV-cached sampling (greedy, temperature, top-k, top-p) with streamed text."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from ponderlm.errors import PonderError


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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


@torch.no_grad()
def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None, steps_used: list[int] | None = None) -> str:
    """Continue `prompt`; `on_text` receives each new piece of decoded text as soon as it is known.

    steps_used, if given, receives the latent steps the model ran before emitting each generated token.
    """
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        ids = [eos_id]  # an empty prompt starts a new document
    if max_new_tokens < 0:
        raise PonderError("--max-new-tokens must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    used: list[torch.Tensor] = []
    logits = model.decode(torch.tensor([ids]), cache, used)
    new_ids: list[int] = []
    emitted = ""
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if stop_at_eos and token.item() == eos_id:
            break
        new_ids.append(token.item())
        if steps_used is not None:
            steps_used.append(int(used[-1][0]))
        text = tokenizer.decode(new_ids)
        # A byte-level BPE token may end inside a UTF-8 character; wait until the character is complete.
        if on_text is not None and not text.endswith("\ufffd"):
            on_text(text[len(emitted):])
            emitted = text
        if len(new_ids) < max_new_tokens:
            logits = model.decode(token[:, None], cache, used)
    text = tokenizer.decode(new_ids)
    if on_text is not None and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return text
