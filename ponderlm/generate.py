"""`ponderlm generate`: KV-cached sampling (greedy, temperature, top-k, top-p) with streamed text.

`continuation` is the one generation loop; `generate` and the lm-eval harness both run it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from tokenizers import Tokenizer

from ponderlm.data import end_of_document_id
from ponderlm.errors import PonderError


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


def continuation(model, prompt_ids: list[int], max_new_tokens: int, choose_next: Callable[[torch.Tensor], torch.Tensor],
                 tau: float | None = None, extra_steps: list[torch.Tensor] | None = None) -> Iterator[int]:
    """The KV-cached generation loop: yields up to max_new_tokens new token ids; the caller stops by breaking.

    choose_next maps the logits (1, V) to the next token id (1,); tau is the pruning threshold of adaptive methods.
    extra_steps, if given, receives the extra steps of every token fed to the model, the prompt's included.
    """
    device = model.backbone.lm_head.weight.device
    autocast = model.config.autocast
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    with torch.no_grad(), autocast(device.type):
        logits = model.decode(torch.tensor([prompt_ids], device=device), cache, tau, extra_steps)
    for index in range(max_new_tokens):
        token = int(choose_next(logits))
        yield token
        if index + 1 < max_new_tokens:  # the last token is never fed back: nothing would read its logits
            with torch.no_grad(), autocast(device.type):
                logits = model.decode(torch.tensor([[token]], device=device), cache, tau, extra_steps)


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, tau: float | None = None,
             on_text: Callable[[str], None] | None = None, extra_steps_per_token: list[int] | None = None) -> str:
    """Continue `prompt` until EOS or max_new_tokens; `on_text` receives each new piece of text once it is known.

    extra_steps_per_token, if given, receives the extra steps the model ran before emitting each generated token.
    """
    context = model.config.data.seq_len  # the longest window the model was trained on
    if not 0 <= max_new_tokens < context:
        raise PonderError(f"--max-new-tokens must be between 0 and {context - 1}: the model's context is {context} "
                          "tokens (data.seq_len), prompt included")
    eos_id = end_of_document_id(tokenizer)
    ids = tokenizer.encode(prompt).ids or [eos_id]  # an empty prompt starts a new document
    if len(ids) + max_new_tokens > context:
        keep = context - max_new_tokens
        print(f"ponderlm: notice: the prompt has {len(ids)} tokens; only its last {keep} are used, so that it and "
              f"{max_new_tokens} new tokens fit the model's context of {context}", file=sys.stderr)
        ids = ids[-keep:]
    generator = torch.Generator().manual_seed(seed)
    extra_steps: list[torch.Tensor] = []
    new_ids: list[int] = []
    emitted = ""
    for token in continuation(model, ids, max_new_tokens,
                              lambda logits: sample_next(logits, temperature, top_k, top_p, generator),
                              tau, extra_steps):
        if token == eos_id:
            break
        new_ids.append(token)
        if extra_steps_per_token is not None:
            extra_steps_per_token.append(int(extra_steps[-1][0]))
        text = tokenizer.decode(new_ids)
        # A byte-level BPE token may end inside a UTF-8 character; wait until the character is complete.
        if on_text is not None and not text.endswith("\ufffd"):
            on_text(text[len(emitted):])
            emitted = text
    text = tokenizer.decode(new_ids)
    if on_text is not None and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return text
