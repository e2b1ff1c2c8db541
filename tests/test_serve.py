"""The OpenAI-compatible server (python -m gemma3_fast.serve), through the real `openai` client and raw HTTP,
started by the tests on 127.0.0.1: on the tiny random model for most, on the real 270M for the text that
temperature 0 must share with the batch-1 generator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from gemma3_fast.generation import Gemma3LM
from gemma3_fast.loading import load_model_and_tokenizer

openai = pytest.importorskip("openai")

PROMPTS = ["w1 w2 w3", "w7", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21", "w5 w5 w5 w5 w5", "w40 w41",
           "w100 w101 w102 w103", "w200", "w33 w34 w35 w36 w37 w38"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, method: str, path: str, body: bytes | None = None, timeout: float = 60):
    req = urllib.request.Request(base + path, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@contextmanager
def running_server(*args: str, startup_s: float = 180):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_fast.serve", "--port", str(port), "--model-name", "t", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        seen_loading = False
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stdout.read()}")
            try:
                status, _, body = http(base, "GET", "/health", timeout=2)
                if status == 200:
                    break
                assert status == 503 and json.loads(body)["status"] == "loading", (status, body)
                seen_loading = True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become healthy")
            time.sleep(0.1)
        yield base, seen_loading
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def client(base: str):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(base: str) -> dict[str, float]:
    _, _, text = http(base, "GET", "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(base: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        if m["gemma3_fast_requests_running"] == 0 and m["gemma3_fast_requests_queued"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still running: {m}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_server(tiny_folder):
    with running_server("--model", str(tiny_folder), "--parallel", "4", "--ctx-size", "128") as (base, _):
        yield base


@pytest.fixture(scope="module")
def tiny_lm(tiny_folder) -> Gemma3LM:
    return Gemma3LM(*load_model_and_tokenizer(tiny_folder, "auto", "cpu", "auto"))


def complete(base, prompt, stream=False, **kw):
    """The text and finish reason of a completion, streamed or not."""
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    extra = {k: kw.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in kw}  # not in OpenAI's API
    if extra:
        kw["extra_body"] = extra
    c = client(base)
    if not stream:
        r = c.completions.create(model="t", prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason
    text, finish = [], None
    for chunk in c.completions.create(model="t", prompt=prompt, stream=True, **kw):
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_models_and_health(tiny_server):
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["t"]  # --model-name
    assert http(tiny_server, "GET", "/health")[:3:2] == (200, '{"status":"ok"}')


def test_concurrent_greedy_equals_batch_1_generator(tiny_server, tiny_lm):
    """8 requests on 4 slots at once (some wait for a slot): each one's text is the batch-1 generator's."""
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: complete(tiny_server, p, max_tokens=30), PROMPTS))
    for prompt, (text, finish) in zip(PROMPTS, got):
        assert text == tiny_lm.generate(prompt, max_new_tokens=30), prompt
        assert finish == ("length" if len(tiny_lm.last_stats.token_ids) == 30 and
                          tiny_lm.last_stats.token_ids[-1] not in tiny_lm.tokenizer.stop_ids else "stop")
    assert wait_idle(tiny_server)["gemma3_fast_requests_running"] == 0


@pytest.mark.parametrize("sampling", [dict(temperature=0),
                                      dict(temperature=1.3, top_k=50, top_p=0.9, repetition_penalty=20, seed=11)])
def test_streamed_text_equals_non_streamed(tiny_server, sampling):
    for prompt in PROMPTS[:3]:
        assert complete(tiny_server, prompt, **sampling) == complete(tiny_server, prompt, stream=True, **sampling)


def test_chat_streamed_equals_non_streamed_with_usage(tiny_server):
    c = client(tiny_server)
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w1 w2"}]
    whole = c.chat.completions.create(model="t", messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="t", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1  # one id on every chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_seeds_reproduce_whatever_runs_beside(tiny_server):
    kw = dict(temperature=2, repetition_penalty=20, max_tokens=30)  # the tiny model's own picks are too sure
    alone = [complete(tiny_server, "w1 w2", seed=s, **kw) for s in (1, 2)]
    assert alone[0] != alone[1]  # different seeds, different samples
    with ThreadPoolExecutor(6) as pool:  # the same seeds, now beside other requests
        jobs = [pool.submit(complete, tiny_server, "w1 w2", seed=s, **kw) for s in (1, 2)]
        others = [pool.submit(complete, tiny_server, p, **kw) for p in PROMPTS[:4]]
        assert [j.result() for j in jobs] == alone
        [o.result() for o in others]


def test_stop_strings_cut_the_text_and_are_never_streamed_in_part(tiny_server):
    full, _ = complete(tiny_server, PROMPTS[2], max_tokens=30)
    words = full.split()
    assert len(words) > 4, full
    stop = " ".join(words[2:4])  # two words: a stop string made of several tokens
    want = full[:full.index(stop)]
    for stream in (False, True):
        assert complete(tiny_server, PROMPTS[2], stream=stream, max_tokens=30, stop=[stop, "never"]) == (want, "stop")
    # a prefix of the stop string that never completes is released in full
    assert complete(tiny_server, PROMPTS[2], stream=True, max_tokens=30, stop=stop + " zzz") == (full, "length")


def test_disconnect_frees_the_slot(tiny_server):
    before = metrics(tiny_server)["gemma3_fast_requests_total{finish_reason=\"cancelled\"}"]
    body = json.dumps({"prompt": "w1", "max_tokens": 120, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(tiny_server + "/v1/completions", data=body, headers={"Content-Type":
                                                                                      "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.readline()  # the first event: the request is running
    m = wait_idle(tiny_server)
    assert m["gemma3_fast_requests_total{finish_reason=\"cancelled\"}"] == before + 1
    assert complete(tiny_server, "w1")[1] in ("length", "stop")  # and the server goes on


BAD_REQUESTS = [
    ({"model": "other"}, "model", "not served here"),
    ({"max_tokens": 200}, "max_tokens", "exceeds the context of 128"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": "many"}, "max_tokens", "must be an integer"),
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"temperature": 9}, "temperature", "<= 2"),
    ({"top_p": 0}, "top_p", "> 0"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"min_p": 1}, "min_p", "< 1"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"stop": [""]}, "stop", "non-empty string"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"n": 2}, "n", "must be 1"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": ["w1", "w2"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 99999]}, "prompt", "99999 is not a token id"),
    ({"prompt": None}, "prompt", "non-empty string"),
    ({"logprobs": 3}, "logprobs", "not supported"),
    ({"stream": "yes"}, "stream", "true or false"),
]


@pytest.mark.parametrize("fields,param,message", BAD_REQUESTS, ids=[b[1] + str(i) for i, b in enumerate(BAD_REQUESTS)])
def test_bad_completion_requests_get_400_naming_the_field(tiny_server, fields, param, message):
    body = {"model": "t", "prompt": "w1 w2", "max_tokens": 4, **fields}
    status, _, text = http(tiny_server, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error", err


@pytest.mark.parametrize("messages,param", [([], "messages"), ([{"role": "user", "content": "  "}], "messages"),
                                             ([{"role": "robot", "content": "hi"}], "messages[0].role"),
                                             ([{"role": "user", "content": 5}], "messages[0].content"),
                                             ("hello", "messages")])
def test_bad_chat_requests_get_400_naming_the_field(tiny_server, messages, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(tiny_server).chat.completions.create(model="t", messages=messages, max_tokens=4)
    assert err.value.body["param"] == param, err.value.body


def test_malformed_json_and_unknown_paths(tiny_server):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, _, text = http(tiny_server, "POST", "/v1/chat/completions", body)
        assert status == 400 and "JSON" in json.loads(text)["error"]["message"], text
    status, _, text = http(tiny_server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(text)
    assert complete(tiny_server, "w1")[1] in ("length", "stop")  # still serving


def test_full_queue_answers_503_with_retry_after(tiny_folder):
    """One slot, a queue of one: a third request while two are in gets 503 + Retry-After, and the others finish.
    (The reference backend steps slowly enough for the three to overlap.)"""
    with running_server("--model", str(tiny_folder), "--parallel", "1", "--max-queue", "1", "--ctx-size", "256",
                        "--backend", "reference") as (base, _):
        body = json.dumps({"prompt": "w1", "max_tokens": 250, "temperature": 0}).encode()
        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(http, base, "POST", "/v1/completions", body) for _ in range(2)]
            deadline = time.monotonic() + 10
            while metrics(base)["gemma3_fast_requests_queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, headers, text = http(base, "POST", "/v1/completions", body)
            assert status == 503 and headers.get("retry-after", headers.get("Retry-After")) == "1", text
            assert json.loads(text)["error"]["code"] == "queue_full"
            assert [f.result()[0] for f in first] == [200, 200]
        wait_idle(base)


def test_soak_mixed_requests_leave_no_slot_behind(tiny_server):
    """120 requests at concurrency 16 on 4 slots: mixed lengths, streamed and not, some cancelled mid-stream,
    some malformed. Every valid one finishes with a correct reason, every invalid one gets its 400, and the
    server ends with nothing running."""
    def one(i: int):
        if i % 10 == 3:  # malformed
            status, _, _ = http(tiny_server, "POST", "/v1/completions", b'{"prompt": "w1", "max_tokens": -1}')
            return "bad", status
        n = 5 + (i * 7) % 40
        if i % 10 == 7:  # cancelled mid-stream
            stream = client(tiny_server).completions.create(model="t", prompt=PROMPTS[i % 8], max_tokens=100,
                                                            temperature=0.8, seed=i, stream=True)
            next(iter(stream))
            stream.close()
            return "cancelled", None
        text, finish = complete(tiny_server, PROMPTS[i % 8], stream=i % 2 == 0, max_tokens=n, temperature=0.7, seed=i)
        return "ok", finish

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(120)))
    assert all(status == 400 for kind, status in results if kind == "bad")
    assert all(finish in ("stop", "length") for kind, finish in results if kind == "ok")
    m = wait_idle(tiny_server)
    assert m["gemma3_fast_requests_running"] == 0 and m["gemma3_fast_requests_queued"] == 0


def test_cli_errors():
    out = subprocess.run([sys.executable, "-m", "gemma3_fast.serve", "--parallel", "0"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "--parallel must be >= 1, got 0" in out.stderr
    out = subprocess.run([sys.executable, "-m", "gemma3_fast.serve", "--model", "/no/such/model"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--model /no/such/model: no such file or folder" in out.stderr


@pytest.mark.slow
def test_real_model_concurrent_greedy_equals_the_cli(default_gguf):
    """The default model (the GGUF on its blocks), 4 requests at once: each text is the batch-1 CLI's."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three most important inventions in human history are"]
    with running_server("--parallel", "4") as (base, seen_loading):
        assert seen_loading  # /health said 503 "loading" while the model loaded
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: complete(base, p, max_tokens=32), prompts))
    for prompt, (text, _) in zip(prompts, got):
        cli = subprocess.run([sys.executable, "-m", "gemma3_fast.generate", "--prompt", prompt, "--max-new-tokens",
                              "32", "--no-stream"], capture_output=True, text=True, check=True).stdout
        assert cli == prompt + text + "\n", (prompt, text, cli)


def test_engine_survives_a_failing_step(tiny_lm, monkeypatch):
    """A step that raises (a bug) ends the requests in it with "error"; the engine frees their slots and serves
    the next request."""
    from gemma3_fast.engine import Engine, Request

    engine = Engine(tiny_lm, parallel=2, ctx_size=64).start()
    try:
        events: list = []
        done = threading.Event()

        def on_event(kind, value):
            events.append((kind, value))
            if kind == "done":
                done.set()

        real = engine.session.logits
        monkeypatch.setattr(engine.session, "logits", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        engine.submit(Request(tiny_lm.tokenizer.encode("w1 w2"), 5, on_event=on_event))
        assert done.wait(30) and events[-1] == ("done", "error")
        monkeypatch.setattr(engine.session, "logits", real)
        done.clear()
        ok = engine.submit(Request(tiny_lm.tokenizer.encode("w1 w2"), 5, on_event=on_event))
        assert done.wait(30) and events[-1] == ("done", "length") and len(ok.output_ids) == 5
        deadline = time.monotonic() + 10  # "done" is sent before the slot is released, at the step's end
        while engine.stats.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests_total["error"] == 1 and engine.stats.running == 0
    finally:
        engine.close()
