"""Continuous batching: many requests decoded together, joining and leaving between steps.

One engine thread owns the model. Each iteration it admits queued requests into free slots (a slot is one
sequence's preallocated KV cache), runs one prefill chunk of the oldest request still prefilling, then one decode
step of every request that has a token to feed (model.BatchedDecodeSession: each weight read once for the batch),
and samples each row with that request's own parameters and generator. Prompts longer than a chunk are prefilled
across iterations, so the running streams keep flowing while a long prompt comes in.

A request's rows are the logits it would get alone (the batched step is batch-invariant), so its greedy output is
the batch-1 generator's and a seeded sample repeats whatever else runs beside it. Events go back through the
request's `on_event` callback, called on the engine thread: ("text", piece) as text is made (a stop string is
never sent in part: text that could still become one is held back), then ("done", finish_reason): "stop" (an
end-of-sequence token or a stop string), "length" (max_tokens), "cancelled", or "error" (the step failed: the
traceback goes to stderr, the requests in that step end, the engine goes on).
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference_ops
from .generation import Gemma3LM
from .huge_pages import release_freed_memory
from .sampling import SamplingParams, sample
from .tokenizer import StreamDecoder

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class InvalidRequest(ValueError):
    """A request that cannot run here; `param` names the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """The engine's queue holds max_queue requests already: try again later."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[str, str], None] = lambda kind, value: None
    # Set by the engine.
    id: int = 0
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # all text made so far (after a stop string: cut before it)
    sent: int = 0  # characters of text already sent as events
    finish_reason: str | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    _prefilled: int = 0
    _next: int | None = None  # the token the next decode step feeds
    _cancelled: bool = False
    _generator: torch.Generator | None = None  # made at the first sampled token
    _decoder: StreamDecoder | None = None  # made at the first token

    def cancel(self) -> None:
        """Stop this request at the next step (its slot is freed then); safe from any thread."""
        self._cancelled = True


@dataclass
class EngineStats:
    running: int = 0
    queued: int = 0
    requests_total: dict = field(default_factory=lambda: {r: 0 for r in FINISH_REASONS})
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    steps_total: int = 0
    step_seconds_total: float = 0.0
    prefill_seconds_total: float = 0.0


class Engine:
    """`submit(request)` queues a request (QueueFull when `max_queue` are waiting); up to `parallel` run at once,
    each in a KV cache of `ctx_size` positions (default: the model's context). `start()` runs the engine thread,
    `close()` stops it."""

    def __init__(self, lm: Gemma3LM, parallel: int = 8, max_queue: int = 64, ctx_size: int | None = None,
                 prefill_chunk: int = 256):
        context = lm.config.max_position_embeddings
        ctx_size = ctx_size or context
        for name, value, low in (("parallel", parallel, 1), ("max_queue", max_queue, 0), ("ctx_size", ctx_size, 2),
                                 ("prefill_chunk", prefill_chunk, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if ctx_size > context:
            raise ValueError(f"ctx_size {ctx_size} exceeds the model's context of {context} tokens")
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.parallel, self.max_queue, self.ctx_size, self.prefill_chunk = parallel, max_queue, ctx_size, prefill_chunk
        self.caches = [self.model.new_cache(ctx_size) for _ in range(parallel)]
        self.session = self.model.batched_session(self.caches)
        self._argmax = self.model.ops.argmax if self.model.device.type == "cpu" else reference_ops.argmax
        self._free = list(range(parallel - 1, -1, -1))
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = EngineStats()
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did

    # -- the outside ---------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise InvalidRequest (a ValueError naming the field) for a request that cannot run here."""
        if not request.prompt_ids:
            raise InvalidRequest("prompt: the prompt is empty", "prompt")
        vocab = self.model.config.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt: {bad[0]} is not a token id (the vocabulary has {vocab} entries)", "prompt")
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}", "max_tokens")
        need = len(request.prompt_ids) + request.max_tokens
        if need > self.ctx_size:
            raise InvalidRequest(f"max_tokens: the prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                                 f"({request.max_tokens}) = {need} exceeds the context of {self.ctx_size} tokens",
                                 "max_tokens")
        request.params.validate()

    def submit(self, request: Request) -> Request:
        self.check(request)
        with self._cv:
            if self.error is not None:
                raise RuntimeError(f"the engine stopped: {self.error}")
            if len(self._queue) >= self.max_queue + len(self._free):  # the free slots take as many at once
                raise QueueFull(f"{len(self._queue)} requests are queued (the limit, --max-queue)")
            request.id = next(self._ids)
            request.submitted = time.perf_counter()
            self._queue.append(request)
            self.stats.queued = len(self._queue)
            self._cv.notify()
        return request

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="gemma3_fast-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    self._admit()
                    while not self._running and not self._stop:
                        self._cv.wait()
                        self._admit()
                    if self._stop:
                        break
                try:
                    self._iteration()
                except Exception:  # a bug: the requests in flight fail ("error"), the engine serves on
                    traceback.print_exc()
                    with self._cv:
                        for r in list(self._running):
                            self._finish(r, "error")
                            self._release(r)
                        self.stats.running = len(self._running)
        except BaseException as e:  # the engine thread itself broke: fail every request rather than hang them
            with self._cv:
                self.error = e
                for r in list(self._running) + list(self._queue):
                    self._finish(r, "error")
                self._queue.clear()
            raise

    def _admit(self) -> None:
        """Move queued requests into free slots; drop cancelled ones. Holds self._cv."""
        kept = deque()
        for r in self._queue:
            if r._cancelled:
                self._finish(r, "cancelled")
            elif self._free:
                r.slot = self._free.pop()
                self.caches[r.slot].reset()
                self._running.append(r)
                self.stats.prompt_tokens_total += len(r.prompt_ids)
            else:
                kept.append(r)
        self._queue = kept
        self.stats.queued, self.stats.running = len(self._queue), len(self._running)

    def _iteration(self) -> None:
        for r in [r for r in self._running if r._cancelled]:
            self._finish(r, "cancelled")
        prefilling = [r for r in self._running if r._next is None and r.finish_reason is None]
        if prefilling:  # one chunk of the oldest: a long prompt takes several iterations, decode steps between
            r = prefilling[0]
            t0 = time.perf_counter()
            chunk = r.prompt_ids[r._prefilled:r._prefilled + self.prefill_chunk]
            logits = self.model.prefill(torch.tensor(chunk, device=self.model.device), self.caches[r.slot])
            r._prefilled += len(chunk)
            if r._prefilled == len(r.prompt_ids):
                self._push(r, self._pick(r, logits[0]))
            self.stats.prefill_seconds_total += time.perf_counter() - t0
        decoding = [r for r in self._running if r._next is not None and r.finish_reason is None]
        if decoding:
            t0 = time.perf_counter()
            logits = self.session.logits([r._next for r in decoding], [r.slot for r in decoding])
            # The greedy rows' picks in one argmax call over their rows; the others sample, each its own way.
            greedy = [i for i, r in enumerate(decoding) if r.params.temperature == 0 and
                      r.params.repetition_penalty == 1.0]
            picks = dict(zip(greedy, self._argmax(logits[greedy] if len(greedy) < len(decoding) else logits)
                             .tolist())) if greedy else {}
            for i, r in enumerate(decoding):
                self._push(r, picks[i] if i in picks else self._pick(r, logits[i]))
            self.stats.steps_total += 1
            self.stats.step_seconds_total += time.perf_counter() - t0
        finished = [r for r in self._running if r.finish_reason is not None]
        if finished:
            # A prefill's buffers (tens of MB: activations, dequantized tiles) come back to glibc's heap fragmented;
            # without a trim the server's RSS crept up ~10% over 150 mixed requests (bench/serve.py --soak).
            release_freed_memory()
        with self._cv:
            for r in finished:
                self._release(r)
            self.stats.running = len(self._running)

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        if r._generator is None and r.params.temperature > 0:
            r._generator = torch.Generator().manual_seed(r.seed if r.seed is not None else torch.seed())
        seen = None
        if r.params.repetition_penalty != 1.0:
            seen = torch.tensor(r.prompt_ids + r.output_ids)
        return sample(logits.cpu(), r.params, seen, r._generator, self._argmax)

    def _push(self, r: Request, token: int) -> None:
        """A new token of r: its text out (held back while it could still begin a stop string), or the end."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.output_ids.append(token)
        self.stats.generated_tokens_total += 1
        if token in self.tokenizer.stop_ids:
            return self._finish(r, "stop")
        if r._decoder is None:
            r._decoder = self.tokenizer.stream_decoder()
        r.text += r._decoder.push(token)
        last = len(r.output_ids) >= r.max_tokens
        if last:
            r.text += r._decoder.flush()
        for s in r.stop:
            at = r.text.find(s, max(0, r.sent - len(s) + 1))
            if at >= 0:
                r.text = r.text[:at]
                return self._finish(r, "stop")
        if last:
            return self._finish(r, "length")
        safe = len(r.text) - max((_partial_stop(r.text, s) for s in r.stop), default=0)
        if safe > r.sent:
            r.on_event("text", r.text[r.sent:safe])
            r.sent = safe
        r._next = token

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        if reason != "cancelled" and len(r.text) > r.sent:
            r.on_event("text", r.text[r.sent:])
            r.sent = len(r.text)
        self.stats.requests_total[reason] += 1
        r.on_event("done", reason)

    def _release(self, r: Request) -> None:
        """r's slot back to the free list. Holds self._cv."""
        self._running.remove(r)
        self._free.append(r.slot)


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest end of text that begins stop (text that may still turn into it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
