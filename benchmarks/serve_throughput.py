"""`ponderlm serve` under load: generated tokens/s, time to first token and per-token latency with 1, 8, 32 clients.

    .venv/bin/python benchmarks/serve_throughput.py [--clients 1,8,32] [--requests 2] [--k 3]

For vanilla, PonderLM-2 and PonderLM-3 (at the tau that keeps about half of K slots, and at 1e-4) at the `small`
shape, untrained (as benchmarks/engine_speed.py builds them), fp32. Each server runs in a subprocess on 127.0.0.1
with --max-batch 32; that process first measures the engine's own throughput on the same requests (B = 32, no HTTP)
so the two are read side by side. Clients (bare asyncio connections, to leave the CPU to the server) stream greedy completions of 64-token prompts (token ids, 64 new tokens,
generated to the end: `ignore_eos`), each sending --requests requests one after another; the engine alone runs
the same requests with as many rows as there are clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

from engine_speed import build, half_slot_tau
from machine import describe_machine
from ponderlm.engine import Engine, Request


def workload(clients: int, requests: int, args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(1, args.vocab, (clients * requests, args.prompt), generator=generator).tolist()


def plain_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` made-up words, id 0 the EOS: the server needs one; the requests send ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ponderlm.data import ModelTokenizer

    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}},
                                           unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return ModelTokenizer(tokenizer)


def serve_main(args) -> None:
    """The server process: build the model, time the engine alone on every workload, then serve."""
    import uvicorn

    from ponderlm.serve import create_app

    torch.set_num_threads(2)
    model = build(args.method, args)
    engine_rates = {}
    for clients in args.client_counts:  # each client has one request in flight: the engine runs `clients` rows
        prompts = workload(clients, args.requests, args)
        engine = Engine(model, max_batch=clients, max_tokens=args.prompt + args.new)
        start = time.perf_counter()
        sequences = engine.run([Request(p, args.new, tau=args.tau) for p in prompts])
        engine_rates[clients] = sum(len(s.tokens) for s in sequences) / (time.perf_counter() - start)
    app = create_app(model, plain_tokenizer(args.vocab), args.method, tau=args.tau, max_batch=32)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    print(json.dumps({"engine": engine_rates}), flush=True)
    uvicorn.Server(config).run()


async def streamed_tokens(port: int, body: dict) -> list[tuple[float, int]]:
    """POST a streaming completion over a bare asyncio connection (an HTTP client light enough to leave the CPU
    to the server) and return (arrival time, tokens) for every chunk that carried tokens."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload)
    status = await reader.readline()
    assert b" 200 " in status, status
    while await reader.readline() not in (b"\r\n", b""):
        pass
    arrivals, buffer = [], b""
    while True:  # chunked transfer encoding, server-sent events inside
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            start = event.find(b'"extra_steps": [')
            if start >= 0:
                steps = event[start + 16: event.index(b"]", start)]
                if steps.strip():
                    arrivals.append((time.perf_counter(), steps.count(b",") + 1))
    writer.close()
    return arrivals


async def client_load(port: int, clients: int, args) -> dict:
    prompts = workload(clients, args.requests, args)
    first_token, per_token, tokens = [], [], 0

    async def one_client(index: int) -> None:
        nonlocal tokens
        for r in range(args.requests):
            body = {"prompt": prompts[index * args.requests + r], "max_tokens": args.new, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            sent = time.perf_counter()
            arrivals = await streamed_tokens(port, body)
            tokens += sum(n for _, n in arrivals)
            first_token.append(arrivals[0][0] - sent)
            if len(arrivals) > 1:
                per_token.append((arrivals[-1][0] - arrivals[0][0]) / (len(arrivals) - 1))

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    seconds = time.perf_counter() - start

    def quantile(values, q):
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    return {"tokens_per_s": tokens / seconds, "ttft_p50": quantile(first_token, 50),
            "ttft_p95": quantile(first_token, 95), "token_p50": quantile(per_token, 50),
            "token_p95": quantile(per_token, 95), "tokens": tokens}


def run_server(method: str, tau: float | None, args) -> tuple[dict, dict]:
    command = [sys.executable, __file__, "--serve", method, "--port", str(args.port), "--clients", args.clients,
               "--requests", str(args.requests), "--k", str(args.k), "--prompt", str(args.prompt),
               "--new", str(args.new), "--router-std", str(args.router_std)]
    if tau is not None:
        command += ["--tau", str(tau)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    try:
        engine = json.loads(process.stdout.readline())["engine"]
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
                time.sleep(0.2)
        served = {clients: asyncio.run(client_load(args.port, clients, args)) for clients in args.client_counts}
        return {int(k): v for k, v in engine.items()}, served
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--router-std", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="benchmarks/results/serve_throughput.md")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the server process for this method
    parser.add_argument("--tau", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.client_counts = [int(c) for c in args.clients.split(",")]
    args.shape, args.vocab, args.score_len = "small", 8192, 0
    if args.serve:
        args.method = args.serve
        serve_main(args)
        return
    torch.set_num_threads(2)
    tau, kept = half_slot_tau(build("ponderlm3", args), args.k)
    configs = [("vanilla", None), ("ponderlm2", None), ("ponderlm3", tau), ("ponderlm3", 1e-4)]
    started = time.perf_counter()
    results = {}
    for method, method_tau in configs:
        results[(method, method_tau)] = run_server(method, method_tau, args)
        print(f"{method} tau={method_tau}: {results[(method, method_tau)]}", file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - started) / 60

    lines = ["# `ponderlm serve` under load", "", "```", " ".join(["python", *sys.argv]), "```", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {describe_machine()}; "
             f"{minutes:.1f} min; clients and server on the same 2 cores",
             f"- `small` shape, K = {args.k}, untrained, fp32; ponderlm3 router ~ N(0, {args.router_std}), tau {tau:g} "
             f"keeps {kept:.2f} of {args.k} slots on random text; {args.prompt}-token prompts, {args.new} greedy "
             f"new tokens, {args.requests} requests per client in a row, --max-batch 32", "",
             "| method | tau | clients | served tokens/s | engine alone tokens/s | served / engine | TTFT p50 / p95 (s) "
             "| per-token p50 / p95 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for (method, method_tau), (engine, served) in results.items():
        for clients in args.client_counts:
            s = served[clients]
            lines.append(f"| {method} | {'' if method_tau is None else f'{method_tau:g}'} | {clients} | "
                         f"{s['tokens_per_s']:,.1f} | {engine[clients]:,.1f} | "
                         f"**{s['tokens_per_s'] / engine[clients]:.2f}** | {s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | "
                         f"{s['token_p50'] * 1e3:.1f} / {s['token_p95'] * 1e3:.1f} |")
    lines.append("")
    for clients in args.client_counts:
        ratio = results[("ponderlm3", tau)][1][clients]["tokens_per_s"] / \
            results[("ponderlm2", None)][1][clients]["tokens_per_s"]
        lines.append(f"- {clients} clients: served ponderlm3 (tau {tau:g}) / ponderlm2 = **{ratio:.2f}**")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
