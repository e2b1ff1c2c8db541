"""`python -m gemma3_fast.serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

POST /v1/completions and /v1/chat/completions (streamed as server-sent events, or not), GET /v1/models,
GET /health (503 while the model loads), GET /metrics (Prometheus text). Bad requests get a 4xx with an
OpenAI-style error naming the field; a full queue gets 503 with Retry-After; a client that disconnects cancels
its request at the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, InvalidRequest, QueueFull, Request
from .sampling import SamplingParams

DEFAULT_CTX = 4096
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request parsing: every field checked, each error naming it ------------------------------------------------
def _number(body: dict, name: str, default, low=None, high=None, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise BadRequest(f"{name} must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise BadRequest(f"{name} must be <= {high}, got {value}", name)
    return value


def parse_sampling(body: dict) -> tuple[SamplingParams, int | None, list[str]]:
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    top_k = _number(body, "top_k", 0, 0, integer=True)
    min_p = _number(body, "min_p", 0.0, 0, 1)
    if min_p >= 1:
        raise BadRequest(f"min_p must be < 1, got {min_p}", "min_p")
    penalty = _number(body, "repetition_penalty", 1.0, 0, low_open=True)
    seed = _number(body, "seed", None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of at most 4 of them", "stop")
    n = _number(body, "n", 1, 1, integer=True)
    if n != 1:
        raise BadRequest(f"n must be 1 (one choice per request), got {n}", "n")
    unsupported = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                   "suffix": (None, ""), "tools": (None, []), "functions": (None, [])}
    for name, allowed in unsupported.items():
        if name in body and body[name] not in allowed:
            raise BadRequest(f"{name} is not supported by this server", name)
    return SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p), float(penalty)), seed, stop


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}].role must be one of system, developer, user, assistant",
                             f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise BadRequest("messages: every message is empty", "messages")
    return out


class Server:
    """The app's state: the engine once the model has loaded, the served model's name, counters."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model_name = args.model_name or (Path(args.model).name if args.model else "gemma-3-270m")
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.http_errors = 0

    def load(self) -> None:
        from .generation import load
        from .ops import set_gguf_activations

        try:
            set_gguf_activations(self.args.gguf_activations)
            lm = load(self.args.model, self.args.dtype, self.args.device, self.args.backend, quiet=True,
                      quantize=self.args.quantize)
            ctx = min(self.args.ctx_size, lm.config.max_position_embeddings)
            self.engine = Engine(lm, self.args.parallel, self.args.max_queue, ctx, self.args.prefill_chunk).start()
        except Exception as e:  # /health reports it; the process stays up to say so
            self.load_error = f"{type(e).__name__}: {e}"
            print(f"gemma3_fast.serve: could not load the model: {self.load_error}", file=sys.stderr, flush=True)

    def request(self, body: dict, chat: bool) -> tuple[Request, int]:
        """The engine request for an API body (BadRequest for anything wrong) and its prompt's token count."""
        engine = self.engine
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"model {model!r} is not served here (this server serves {self.model_name!r})", "model",
                             code="model_not_found")
        params, seed, stop = parse_sampling(body)
        tok = engine.tokenizer
        if chat:
            try:
                prompt_ids = tok.encode(tok.apply_chat_template(parse_messages(body)))
            except ValueError as e:
                raise BadRequest(f"messages: {e}", "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise BadRequest("prompt is empty", "prompt")
                prompt_ids = tok.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt):
                prompt_ids = list(prompt)
            else:
                raise BadRequest("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                                 "prompt")
        room = engine.ctx_size - len(prompt_ids)
        if room < 1:
            raise BadRequest(f"prompt: {len(prompt_ids)} tokens leave no room in the context of {engine.ctx_size}",
                             "prompt")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, name, room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room), 1,
                             integer=True)
        request = Request(prompt_ids, max_tokens, params, seed, stop)
        try:
            engine.check(request)
        except InvalidRequest as e:  # the field as the client spelled it (chat: max_completion_tokens)
            param = name if e.param == "max_tokens" else e.param
            raise BadRequest(str(e).replace("max_tokens", name), param) from None
        return request, len(prompt_ids)

    def metrics(self) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP gemma3_fast_{name} {help_}", f"# TYPE gemma3_fast_{name} {kind}"])
            for labels, value in samples:
                lines.append(f"gemma3_fast_{name}{labels} {value}")

        s = self.engine.stats if self.engine else None
        metric("requests_running", "gauge", "Requests in a slot (prefilling or decoding).", [("", s.running if s else 0)])
        metric("requests_queued", "gauge", "Requests waiting for a slot.", [("", s.queued if s else 0)])
        metric("slots", "gauge", "Sequences decoded at once at most (--parallel).",
               [("", self.engine.parallel if self.engine else 0)])
        metric("requests_total", "counter", "Finished requests by finish reason.",
               [(f'{{finish_reason="{k}"}}', v) for k, v in (s.requests_total.items() if s else [])])
        metric("http_errors_total", "counter", "Requests answered with an error status.", [("", self.http_errors)])
        metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", s.prompt_tokens_total if s else 0)])
        metric("generated_tokens_total", "counter", "Tokens generated.",
               [("", s.generated_tokens_total if s else 0)])
        metric("decode_step_seconds", "summary", "Batched decode steps.",
               [("_sum", f"{s.step_seconds_total if s else 0:.6f}"), ("_count", s.steps_total if s else 0)])
        metric("prefill_seconds_total", "counter", "Time in prefill chunks.",
               [("", f"{s.prefill_seconds_total if s else 0:.6f}")])
        return "\n".join(lines) + "\n"


def create_app(args: argparse.Namespace, load_now: bool = False):
    server = Server(args)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_now:
            server.load()
        else:  # in a thread: /health answers 503 meanwhile
            threading.Thread(target=server.load, name="gemma3_fast-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.close()

    app = FastAPI(title="gemma3_fast", version="1", lifespan=lifespan)
    app.state.server = server

    def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        server.http_errors += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return error(400, str(exc))

    @app.get("/health")
    async def health():
        if server.engine is not None:
            return {"status": "ok"}
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "gemma3_fast"}]}

    async def generate(http: HTTPRequest, chat: bool):
        if server.engine is None:
            msg = server.load_error or "the model is still loading"
            return error(503, msg, headers={"Retry-After": "5"})
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            request, prompt_tokens = server.request(body, chat)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream must be true or false", "stream")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise BadRequest("stream_options must be an object", "stream_options")
        except BadRequest as e:
            return error(e.status, e.message, e.param, e.code)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.on_event = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        try:
            server.engine.submit(request)
        except QueueFull as e:
            return error(503, f"the server is busy: {e}", code="queue_full", headers={"Retry-After": "1"})
        except ValueError as e:
            return error(400, str(e))
        except RuntimeError as e:
            return error(500, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            n = len(request.output_ids)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if not stream:
            text = []
            try:
                while True:
                    try:
                        what, value = await asyncio.wait_for(events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            request.cancel()
                            return error(499, "the client disconnected")
                        continue
                    if what == "text":
                        text.append(value)
                    else:
                        break
            except asyncio.CancelledError:
                request.cancel()
                raise
            if value in ("cancelled", "error"):
                return error(500, f"the request ended with an {value} in the server (its log has the details)")
            if chat:
                ch = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                      "finish_reason": value}
            else:
                ch = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": value}
            return {"id": rid, "object": kind, "created": created, "model": server.model_name, "choices": [ch],
                    "usage": usage()}

        include_usage = bool(options.get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list, with_usage: bool = False) -> str:
            out = {"id": rid, "object": chunk_kind, "created": created, "model": server.model_name,
                   "choices": choices}
            if include_usage:
                out["usage"] = usage() if with_usage else None
            return f"data: {json.dumps(out)}\n\n"

        async def body_stream():
            try:
                if chat:
                    yield sse([choice("", None, first=True)])
                while True:
                    what, value = await events.get()
                    if what == "text":
                        yield sse([choice(value, None)])
                        continue
                    if value == "error":
                        failed = error_body("the request failed in the server (its log has the details)",
                                            kind="server_error")
                        yield f"data: {json.dumps(failed)}\n\n"
                    elif value != "cancelled":
                        yield sse([choice(None, value)])
                        if include_usage:
                            yield sse([], with_usage=True)
                    yield "data: [DONE]\n\n"
                    return
            finally:  # the client went away (or the stream ended): a running request stops at the next step
                request.cancel()

        return StreamingResponse(body_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await generate(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await generate(http, chat=True)

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--model-path", dest="model", default=None,
                   help="Hugging Face folder or .gguf file (default: Gemma 3 270M)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: the file's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--parallel", "-np", type=int, default=8, help="sequences decoded at once (KV cache slots)")
    p.add_argument("--ctx-size", type=int, default=DEFAULT_CTX,
                   help=f"positions per slot: prompt + max_tokens (default {DEFAULT_CTX}, at most the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per iteration, between decode steps of the running requests")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: a GGUF runs on its own quantized blocks, a folder in float32")
    p.add_argument("--quantize", default="none", choices=["none", "int8"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="the C++ batched steps run on the CPU; other devices step through the PyTorch reference")
    p.add_argument("--backend", default="auto", choices=["auto", "extension", "reference"])
    p.add_argument("--gguf-activations", default="fp32", choices=["fp32", "int16"])
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("parallel", "ctx_size", "prefill_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"--model {args.model}: no such file or folder")
    import uvicorn

    print(f"gemma3_fast.serve: loading the model; http://{args.host}:{args.port}/v1 (GET /health says when it is "
          "ready)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(args), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
