"""`ponderlm serve`: an OpenAI-compatible HTTP server over the engine, with continuous batching.

One thread owns the engine (`EngineWorker`): requests reach it through a queue and it steps the running batch,
handing each sequence's progress back to the request's event loop; HTTP handlers never touch engine state. Every
request is its own sequence, so requests join and leave the batch at every step and a greedy request's output does
not depend on what it shares the batch with.

Endpoints follow the OpenAI schema, and vLLM's behaviour where OpenAI is silent: `POST /v1/completions` (prompt as
text, token ids, or a list of either; streaming; logprobs with echo, which lm-eval's `local-completions` reads),
`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and the tokenizer endpoints of lm-eval's remote
tokenizer (`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`). Ponder extensions: `tau` per request, and
in every response the extra steps each generated token ran (`extra_steps`) and the inference FLOPs spent (`usage`).
`GET /` is a page that streams a completion with each token shaded by its extra steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ponderlm.data import ModelTokenizer
from ponderlm.engine import Engine, Request, Sampling
from ponderlm.engine_worker import EngineWorker, ServerBusy, Update
from ponderlm.errors import PonderError
from ponderlm.generate import TextStream

PAGE = Path(__file__).parent / "static" / "serve.html"
MAX_LOGPROBS = 20
FLOPS_EVERY = 0.25  # seconds between the running FLOPs a stream reports (and in its last chunk)
CHAT_TEMPLATE = "{role}: {content}\n"  # each message, then "assistant:" (a model without a chat template of its own)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


# ----- request bodies -----

class GenerationBody(BaseModel):
    """What completions and chat share: the model, sampling, stop strings, streaming, and the ponder extension tau."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tau: float | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    ignore_eos: bool = False  # vLLM's: generate max_tokens even past the end-of-document token


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False


class TokenizeBody(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeBody(BaseModel):
    tokens: list[int]


# ----- the service -----

class Service:
    """What the endpoints share: the model, its tokenizer, the worker, and how requests become engine requests."""

    def __init__(self, model, tokenizer: ModelTokenizer, name: str, tau: float | None, max_batch: int,
                 max_queue: int, max_model_len: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.tau = tau
        if max_model_len is not None and not 1 < max_model_len <= model.config.context:
            raise PonderError(f"--max-model-len must be between 2 and the model's context, "
                              f"{model.config.context}; got {max_model_len}")
        self.context = max_model_len or model.config.context
        self.created = int(time.time())
        self.worker = EngineWorker(Engine(model, max_batch=max_batch, max_tokens=self.context), max_queue)

    # --- building requests ---

    def prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(token, int) for token in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for item in prompt:
            ids = self.tokenizer.encode_prompt(item) if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, "a prompt must hold at least one token", param="prompt")
            out.append(ids)
        return out

    def request(self, ids: list[int], body: GenerationBody, max_tokens: int, keep_logprobs: int | None,
                ignore_eos: bool = False) -> Request:
        if body.n != 1:
            raise APIError(400, "only n = 1 is supported; send the request several times with different seeds",
                           param="n")
        if len(ids) + max_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; the prompt has {len(ids)} and "
                           f"max_tokens asks for {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        tau = body.tau if body.tau is not None else self.tau
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        try:
            sampling = Sampling(body.temperature, max(body.top_k, 0), body.top_p, seed)
        except PonderError as exc:
            raise APIError(400, str(exc), param="temperature") from None
        stop_ids = () if ignore_eos else self.tokenizer.stop_ids
        return Request(ids, max_tokens, sampling, stop_ids=stop_ids, tau=tau, logprobs=keep_logprobs)

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        if self.tokenizer.chat_template:
            try:
                return self.tokenizer.encode_chat([m.model_dump() for m in messages])
            except PonderError as exc:
                raise APIError(400, str(exc), param="messages") from None
        plain = "".join(CHAT_TEMPLATE.format(role=m.role, content=m.content) for m in messages) + "assistant:"
        return self.tokenizer.encode_prompt(plain)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    # --- running them ---

    async def run(self, request: Request) -> AsyncIterator[Update]:
        """The updates of one request as the engine makes them; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        try:
            ticket = self.worker.submit(request, loop, updates)
        except PonderError as exc:
            raise APIError(400, str(exc)) from None
        except ServerBusy as exc:
            raise APIError(429, str(exc), kind="rate_limit_error") from None
        finished = False
        try:
            while True:
                update = await updates.get()
                if isinstance(update, Exception):
                    raise APIError(500, f"the engine failed: {update}", kind="server_error")
                finished = update.finish_reason is not None
                yield update
                if finished:
                    return
        finally:
            if not finished:
                self.worker.cancel(ticket)

    def flops(self, extra_steps: list[int]) -> float:
        return self.model.inference_flops(torch.tensor([extra_steps])) if extra_steps else 0.0

    def usage(self, prompts: list[list[int]], updates: list[Update]) -> dict:
        completion = sum(len(u.tokens) for u in updates)
        prompt = sum(len(p) for p in prompts)
        generated_steps = [s for p, u in zip(prompts, updates) for s in generated_extra_steps(len(p), u)]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "inference_flops": sum(self.flops(u.extra_steps) for u in updates),
                "mean_extra_steps": sum(generated_steps) / len(generated_steps) if generated_steps else None}

    def logprobs(self, prompt: list[int], update: Update, echo: bool, top: int) -> dict:
        """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        generated = update.tokens
        first = 0 if echo else len(prompt)
        ids = (prompt + generated)[first:]
        values = ([None] + update.token_logprobs)[first:][: len(ids)]
        tops = ([None] + [{self.piece(i): v for i, v in t} for t in update.top_logprobs])[first:][: len(ids)] \
            if top > 0 else None
        pieces = [self.piece(i) for i in ids]
        offsets, position = [], 0
        for piece in pieces:
            offsets.append(position)
            position += len(piece)
        return {"tokens": pieces, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


    # --- endpoints ---

    async def health(self) -> dict:
        return {"status": "ok"}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "ponderlm", "max_model_len": self.context,
                                            "method": self.model.config.method}]}

    async def tokenizer_info(self) -> dict:
        tokenizer = self.tokenizer
        return {"eos_token": self.piece(tokenizer.document_id),
                "bos_token": None if tokenizer.bos_id is None else self.piece(tokenizer.bos_id), "pad_token": None,
                "chat_template": tokenizer.chat_template, "model_max_length": self.context,
                "vocab_size": self.model.config.model.vocab_size}

    async def tokenize(self, body: TokenizeBody) -> dict:
        # As prompts are encoded: a special token written in the text is that token (lm-eval finds the EOS id so).
        tokens = self.tokenizer.encode_prompt(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.context}

    async def detokenize(self, body: DetokenizeBody) -> dict:
        vocab = self.model.config.model.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def ponder_info(self) -> dict:
        return {"model": self.name, "method": self.model.config.method, "prunable": self.model.prunable,
                "max_extra_steps": self.model.max_extra_steps, "tau": self.model.resolve_tau(self.tau),
                "context": self.context}

    async def page(self) -> str:
        return PAGE.read_text()

    async def completions(self, body: CompletionBody):
        self.check_model(body.model)
        prompts = self.prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        stops = body.stops
        requests = [self.request(ids, body, max_tokens, body.logprobs, body.ignore_eos) for ids in prompts]
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            if len(requests) != 1:
                raise APIError(400, "stream one prompt per request", param="prompt")
            return await self.stream(completion_id, prompts[0], requests[0], stops, body, chat=False)
        results = await asyncio.gather(*(self.collect(r, stops) for r in requests))
        choices = []
        for index, (ids, (update, text, reason)) in enumerate(zip(prompts, results)):
            choice = {"index": index, "text": (self.tokenizer.decode(ids) if body.echo else "") + text,
                      "logprobs": None, "finish_reason": reason,
                      "extra_steps": generated_extra_steps(len(ids), update)}
            if body.logprobs is not None:
                choice["logprobs"] = self.logprobs(ids, update, body.echo, body.logprobs)
            choices.append(choice)
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": self.usage(prompts, [r[0] for r in results])}

    async def chat(self, body: ChatBody):
        self.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are served by /v1/completions (with echo), not by chat", param="logprobs")
        ids = self.chat_ids(body.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else max(0, min(256, self.context - len(ids)))
        stops = body.stops
        stops += ["\nuser:"] if not self.tokenizer.chat_template else []  # the plain template's next turn
        request = self.request(ids, body, max_tokens, None)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return await self.stream(completion_id, ids, request, stops, body, chat=True)
        update, text, reason = await self.collect(request, stops)
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.lstrip(" ")},
                             "finish_reason": reason, "extra_steps": generated_extra_steps(len(ids), update)}],
                "usage": self.usage([ids], [update])}

    async def collect(self, request: Request, stops: list[str]) -> tuple[Update, str, str]:
        """Run a request to its end (or its first stop string): the last update, the text, the finish reason."""
        text = TextStream(self.tokenizer, stops, self.tokenizer.stop_ids)
        last = None
        async with contextlib.aclosing(self.run(request)) as updates:  # leaving at a stop string cancels it
            async for update in updates:
                last = update
                text.update(update.tokens, update.finish_reason is not None)
                if text.stopped:
                    break
        return last, text.text, "stop" if text.stopped else last.finish_reason

    async def stream(self, completion_id: str, ids: list[int], request: Request, stops: list[str], body,
                     chat: bool) -> StreamingResponse:
        """Server-sent events: a chunk per new piece of text with its tokens' extra steps and the FLOPs so far."""
        updates = self.run(request)
        first = await anext(updates)  # errors (a full queue, a bad request) become an HTTP status, not a stream
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        prompt_flops = self.flops(first.extra_steps[: len(ids)])

        flops_sent = [0.0]  # when the FLOPs so far were last computed (about 0.1 ms each: not for every token)

        def chunk(text: str | None, steps: list[int], reason: str | None, update: Update) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            choice["extra_steps"] = steps
            if reason is not None or time.monotonic() - flops_sent[0] > FLOPS_EVERY:
                choice["inference_flops"] = self.flops(update.extra_steps) - prompt_flops
                flops_sent[0] = time.monotonic()
            return sse({"id": completion_id, "object": kind, "created": int(time.time()), "model": self.name,
                        "choices": [choice]})

        async def events():
            text, sent_tokens, update = TextStream(self.tokenizer, stops, self.tokenizer.stop_ids), 0, first
            try:
                if chat:
                    yield sse({"id": completion_id, "object": kind, "created": int(time.time()), "model": self.name,
                               "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                elif body.echo:
                    yield chunk(self.tokenizer.decode(ids), [], None, update)
                while True:
                    done = update.finish_reason is not None
                    piece = text.update(update.tokens, done)
                    steps = generated_extra_steps(len(ids), update)[sent_tokens:]
                    sent_tokens += len(steps)
                    if piece or steps:
                        yield chunk(piece, steps, None, update)
                    if text.stopped or done:
                        break
                    update = await anext(updates)
                yield chunk(None if chat else "", [], "stop" if text.stopped else update.finish_reason, update)
                if include_usage:
                    yield sse({"id": completion_id, "object": kind, "created": int(time.time()), "model": self.name,
                               "choices": [], "usage": self.usage([ids], [update])})
                yield sse("[DONE]")
            finally:
                await updates.aclose()  # a client gone mid-stream frees its row at once

        return StreamingResponse(events(), media_type="text/event-stream")


def generated_extra_steps(prompt_length: int, update: Update) -> list[int]:
    """The extra steps before each generated token: the token before it ran them (the first: the prompt's last)."""
    return update.extra_steps[prompt_length - 1: prompt_length - 1 + len(update.tokens)]


def error_body(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code if code else status}}


def sse(record: dict | str) -> str:
    return f"data: {record if isinstance(record, str) else json.dumps(record)}\n\n"


def create_app(model, tokenizer: ModelTokenizer, name: str, tau: float | None = None, max_batch: int = 32,
               max_queue: int = 256, max_model_len: int | None = None) -> FastAPI:
    """The FastAPI application; its lifespan starts the engine's thread and, on shutdown, lets it finish.
    max_model_len: the longest prompt + completion served (default the model's context); the KV cache holds
    max_batch rows of it."""
    if tau is not None:
        model.check_tau_applies(tau)
    service = Service(model.eval(), tokenizer, name, tau, max_batch, max_queue, max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.worker.stop)

    app = FastAPI(title="ponderlm", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param, exc.code), exc.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(400, message, "invalid_request_error", where or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail), "invalid_request_error"), exc.status_code)

    app.get("/health")(service.health)
    app.get("/v1/models")(service.models)
    app.get("/tokenizer_info")(service.tokenizer_info)
    app.post("/tokenize")(service.tokenize)
    app.post("/detokenize")(service.detokenize)
    app.get("/ponder_info")(service.ponder_info)
    app.get("/", response_class=HTMLResponse)(service.page)
    app.post("/v1/completions")(service.completions)
    app.post("/v1/chat/completions")(service.chat)
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, tau: float | None = None,
          max_batch: int = 32, max_queue: int = 256, max_model_len: int | None = None) -> None:
    """`ponderlm serve`: load a run and serve it until SIGINT/SIGTERM (which finish running requests first)."""
    import uvicorn

    from ponderlm.rundir import RunDir

    run_dir = Path(run_dir)
    model, tokenizer = RunDir(run_dir).load()
    app = create_app(model, tokenizer, run_dir.resolve().name, tau, max_batch, max_queue, max_model_len)
    cache = app.state.service.worker.engine.cache
    print(f"ponderlm: serving {run_dir} ({model.config.method}) on http://{host}:{port}  (page: /, API: /v1); "
          f"KV cache {2 * cache.keys.numel() * cache.keys.element_size() / 2**20:,.0f} MiB for {max_batch} rows of "
          f"{app.state.service.context} tokens (--max-batch, --max-model-len)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


__all__ = ["create_app", "serve"]
