"""`ponderlm serve` with real clients on 127.0.0.1: the openai client, lm-eval's local-completions, raw HTTP under
load and faults. Every server here binds 127.0.0.1 and every loop is bounded."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
import uvicorn

from ponderlm.config import load_config
from ponderlm.data import load_tokenizer
from ponderlm.engine import score
from ponderlm.generate import generate, generate_many
from ponderlm.methods import build_model
from ponderlm.serve import create_app

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def make(method, tokenizer, context=64):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={tokenizer.get_vocab_size()}",
                                  f"data.seq_len={context}"], shared=["ponder.extra_steps=2"])
    model = build_model(config).eval()
    if method == "ponderlm3":  # a decisive router, so tokens keep different numbers of slots
        with torch.no_grad():
            model.router.weight.normal_(0, 0.5)
            model.router.bias.normal_(0, 1)
    return model


class Server:
    """A uvicorn server in a thread of the test process, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.app = app

    def stop(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def servers(tokenizer):
    """vanilla and ponderlm3, each behind its own server."""
    models = {method: make(method, tokenizer) for method in ("vanilla", "ponderlm3")}
    running = {method: Server(create_app(model, tokenizer, f"tiny-{method}", max_batch=4, max_queue=64))
               for method, model in models.items()}
    yield {method: (running[method], models[method]) for method in models}
    for server in running.values():
        server.stop()


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT, **kwargs)


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_the_openai_client_completes_and_chats_streaming_or_not(method, servers, tokenizer):
    from openai import OpenAI

    server, model = servers[method]
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT)
    name = client.models.list().data[0].id
    steps = []
    expected = generate(model, tokenizer, "The King", max_new_tokens=8, extra_steps_per_token=steps)
    done = client.completions.create(model=name, prompt="The King", max_tokens=8, temperature=0)
    assert done.choices[0].text == expected
    raw = done.model_dump()
    assert raw["choices"][0]["extra_steps"] == steps
    assert raw["usage"]["completion_tokens"] == len(steps) and raw["usage"]["inference_flops"] > 0
    pieces = [c.choices[0].text for c in client.completions.create(model=name, prompt="The King", max_tokens=8,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == expected

    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                          temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True)
        if c.choices)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == streamed.lstrip(" ")
    assert chat.usage.prompt_tokens == len(tokenizer.encode("user: Hello\nassistant:").ids)


def test_chat_uses_the_models_template_and_stops_at_each_of_its_end_tokens(instruct_tokenizer_dir):
    """The server writes a chat as the model's own template does and ends the answer at any of its stop tokens,
    as `generate --chat` does."""
    tokenizer = load_tokenizer(instruct_tokenizer_dir / "tokenizer.json")
    model = make("vanilla", tokenizer, context=128)
    with torch.no_grad():
        model.backbone.lm_head.weight[1] *= 3  # <|endoftext|>, the second end token, wins soon
    messages = [{"role": "user", "content": "Who was the king?"}]
    expected = generate_many(model, tokenizer, [messages[0]["content"]], max_new_tokens=20, chat=True)[0]
    server = Server(create_app(model, tokenizer, "instruct", max_batch=2))
    try:
        answer = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0}).json()
    finally:
        server.stop()
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(messages))
    assert answer["choices"][0]["message"]["content"] == expected.text.lstrip(" ")
    assert answer["choices"][0]["finish_reason"] == expected.finish_reason == "stop"
    assert 1 < answer["usage"]["completion_tokens"] < 20


def test_stop_strings_cut_the_text_and_end_the_request(servers, tokenizer):
    server, model = servers["vanilla"]
    full = generate(model, tokenizer, "The King", max_new_tokens=12)
    stop = full[3:5]
    assert stop and full.index(stop) >= 3
    for stream in (False, True):
        response = post(server, "/v1/completions", {"prompt": "The King", "max_tokens": 12, "temperature": 0,
                                                    "stop": [stop], "stream": stream})
        if stream:
            chunks = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            text, reason = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
        assert (text, reason) == (full.split(stop)[0], "stop")


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_echo_logprobs_are_the_exact_scores_of_the_prompt(method, servers):
    server, model = servers[method]
    prompt = [5, 17, 300, 42, 9, 77]
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 2, "echo": True,
                                            "temperature": 0}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == len(prompt) + 1
    log_probs = F.log_softmax(score(model, torch.tensor([prompt]))[0][0].float(), -1)
    expected = log_probs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:len(prompt)]), expected, rtol=1e-4,
                               atol=1e-4)
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert max(logprobs["top_logprobs"][-1].values()) == pytest.approx(logprobs["token_logprobs"][-1])  # greedy


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_lm_eval_local_completions_scores_as_ponderlm_lm_eval_does(method, servers, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from ponderlm.harness import PonderLMHarness

    server, model = servers[method]
    pairs = [("Four score and seven", " years ago"), ("Now we are", " engaged in a great civil war"),
             ("", "Liberty"), ("testing whether that nation ", "can long endure.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i, metadata=("demo", i, 1))
                for i, p in enumerate(pairs)]
    remote = LocalCompletionsAPI(base_url=server.url + "/v1/completions", tokenizer_backend="remote",
                                 model=f"tiny-{method}", max_length=model.config.data.seq_len, num_concurrent=2)
    ours = PonderLMHarness(model, tokenizer, progress=False).loglikelihood(requests)
    theirs = remote.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b


def test_tokenizer_models_and_health_endpoints(servers, tokenizer):
    server, model = servers["ponderlm3"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    listed = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny-ponderlm3"] and listed[0]["max_model_len"] == 64
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert tokenizer.token_to_id(info["eos_token"]) == 0
    tokens = post(server, "/tokenize", {"prompt": "Four score"}).json()["tokens"]
    assert tokens == tokenizer.encode("Four score").ids
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"] == "Four score"
    assert post(server, "/tokenize", {"prompt": info["eos_token"]}).json()["tokens"] == [0]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "ponderlm" in page.text


@pytest.mark.parametrize("body,status,fragment", [
    ("{not json", 400, ""),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": ""}, 400, "at least one token"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 10**6]}, 400, "token ids must lie in"),
    ({"prompt": "word " * 200}, 400, "context is 64 tokens"),
    ({"prompt": "x", "max_tokens": 64}, 400, "context is 64 tokens"),
    ({"prompt": "x", "n": 2}, 400, "n = 1"),
    ({"prompt": "x", "tau": 0.5}, 400, "--tau applies to methods that prune"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
])
def test_bad_requests_get_an_openai_style_4xx_and_the_server_lives_on(body, status, fragment, servers):
    server, _ = servers["vanilla"]
    if isinstance(body, str):
        response = httpx.post(server.url + "/v1/completions", content=body, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
    else:
        response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2}).status_code == 200


def test_tau_is_per_request_for_a_method_that_prunes(servers):
    server, _ = servers["ponderlm3"]
    steps = {}
    for tau in (0.0, 0.99):
        body = post(server, "/v1/completions", {"prompt": "Four score and seven years", "max_tokens": 8,
                                                "temperature": 0, "tau": tau}).json()
        steps[tau] = body["choices"][0]["extra_steps"]
        assert body["usage"]["mean_extra_steps"] == pytest.approx(sum(steps[tau]) / len(steps[tau]))
    assert set(steps[0.0]) == {2} and sum(steps[0.99]) < sum(steps[0.0])
    assert post(server, "/v1/completions", {"prompt": "x", "tau": 1.5}).status_code == 400


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_64_concurrent_clients_each_get_what_it_gets_alone(servers):
    """Mixed streaming and not, through a batch of 4 rows and a queue: every response complete, each greedy text
    equal to the same request served alone; memory back near its level before."""
    server, _ = servers["ponderlm3"]
    prompts = [f"{word} {i}" for i, word in enumerate(["The King", "Four score", "Now", "Whether"] * 16)]

    def ask(index: int, stream: bool) -> str:
        body = {"prompt": prompts[index], "max_tokens": 6 + index % 5, "temperature": 0, "stream": stream}
        response = post(server, "/v1/completions", body)
        assert response.status_code == 200
        if not stream:
            return response.json()["choices"][0]["text"]
        assert response.text.rstrip().endswith("data: [DONE]")
        chunks = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks)

    alone = [ask(i, False) for i in range(8)]
    before = rss_mb()
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda i: ask(i, i % 2 == 0), range(64)))
    assert together[:8] == alone
    assert all(text is not None for text in together)
    service = server.app.state.service
    deadline = time.monotonic() + TIMEOUT
    while service.worker.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.worker.in_flight == 0 and not service.worker.engine.busy
    assert rss_mb() - before < 200  # the cache is allocated once; nothing per request stays behind


def test_a_client_gone_mid_stream_frees_its_row_at_once(tokenizer):
    model = make("ponderlm3", tokenizer, context=1024)  # a long request: seconds, where the others take ms
    server = Server(create_app(model, tokenizer, "one-row", max_batch=1, max_queue=0))
    try:
        service = server.app.state.service
        with httpx.Client(timeout=TIMEOUT) as client:
            with client.stream("POST", server.url + "/v1/completions",
                               json={"prompt": "The King", "max_tokens": 1000, "stream": True, "temperature": 0}
                               ) as response:
                lines = response.iter_lines()  # held: dropping the iterator would close the stream
                next(lines)  # the first chunk: the row is taken
                busy = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
                assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
                assert "retry" in busy.json()["error"]["message"] and service.worker.in_flight == 1
        deadline = time.monotonic() + 10
        while service.worker.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.worker.in_flight == 0  # freed long before its 1000 tokens could have run
        assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_running_requests_then_exits(tiny_data_dir, tmp_path):
    from ponderlm.train import train

    run = tmp_path / "run"
    train(load_config("tiny", ["method=ponderlm3", f"data.path={tiny_data_dir}", "train.steps=2", "data.seq_len=256",
                               "train.batch_tokens=1024", "train.eval_tokens=512"]), run, progress=False)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ponderlm", "serve", str(run), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(timeout=TIMEOUT) as client:
            with client.stream("POST", url + "/v1/completions", json={
                    "prompt": "The King", "max_tokens": 200, "stream": True, "temperature": 0, "stop": ["\x00"],
                    "stream_options": {"include_usage": True}}) as response:
                lines = response.iter_lines()
                next(lines)
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        usage = json.loads(rest[-2][6:])["usage"]
        assert rest[-1] == "data: [DONE]" and len(rest) > 10  # it went on streaming after SIGTERM, to its end
        assert usage["completion_tokens"] == 1 + len(rest) - 3  # a chunk per token, then the last, usage, [DONE]
        assert process.wait(TIMEOUT) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in process.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket on 127.0.0.1), with the flags this
    machine's closed network needs."""

    def __init__(self, profile: Path):
        import websocket

        self.process = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            "--window-size=1000,640", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.process.poll() is None, "Chromium did not start"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json").json() if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=TIMEOUT, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.socket.close()
        self.process.kill()
        self.process.wait(TIMEOUT)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`.ci/run` installs it)")
def test_the_page_streams_a_completion_shaded_by_extra_steps(servers, tmp_path):
    """Headless Chromium loads the page, types a prompt, clicks Generate and waits for the streamed text; the DOM
    holds the tokens with their extra steps, shaded, and a screenshot is taken (the README's picture comes from
    `PONDERLM_SCREENSHOT_RUN=runs/demo pytest tests/test_serve.py -k page`)."""
    import base64

    server, _ = servers["ponderlm3"]
    picture_of = os.environ.get("PONDERLM_SCREENSHOT_RUN")  # e.g. runs/demo: the README's picture, from that run
    if picture_of:
        import ponderlm

        model, tokenizer = ponderlm.load(picture_of)
        server = Server(create_app(model, tokenizer, Path(picture_of).name, max_batch=4))
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        deadline = time.monotonic() + TIMEOUT
        while browser.evaluate("document.getElementById('legend').children.length") != 3:  # K + 1 legend entries
            assert time.monotonic() < deadline, "the page did not load its model's info"
            time.sleep(0.05)
        browser.evaluate(f"document.getElementById('prompt').value = '{'The King' if picture_of else 'Four score'}';"
                         "document.getElementById('max_tokens').value = '40';"
                         f"document.getElementById('temperature').value = '{0.8 if picture_of else 0}';"
                         f"document.getElementById('tau').value = '{2 if picture_of else 7}';"  # 1e-3 or 0.3
                         "document.getElementById('tau').dispatchEvent(new Event('input'));"
                         "document.getElementById('go').click()")
        while browser.evaluate("document.getElementById('status').textContent") != "done":
            assert time.monotonic() < deadline, "the completion did not finish streaming"
            time.sleep(0.05)
        tokens = browser.evaluate("[...document.querySelectorAll('#output .token')].map(s => "
                                  "[s.textContent, s.dataset.steps, getComputedStyle(s).backgroundColor])")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
        if picture_of:
            server.stop()
    assert len(tokens) >= 5 and "".join(t[0] for t in tokens)
    steps = [int(s) for _, joined, _ in tokens for s in joined.split(",")]
    assert set(steps) <= {0, 1, 2} and len(set(steps)) > 1  # K = 2: tokens ran different numbers of steps
    assert len({colour for _, _, colour in tokens}) > 1  # tokens with different steps are shaded differently
    assert len(shot) > 10_000
    (tmp_path / "page.png").write_bytes(shot)
    if picture_of:
        (Path(__file__).parents[1] / "docs" / "images" / "serve_page.png").write_bytes(shot)
