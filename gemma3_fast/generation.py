"""Text generation: prompt -> prefill into a preallocated KV cache -> decode loop with streaming text."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ops as ops_module
from .loading import load_model_and_tokenizer
from .model import Gemma3Model
from .sampling import SamplingParams, sample
from .tokenizer import GemmaTokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    peak_memory_bytes: int = 0
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_tps:.1f} tok/s | generated "
                f"{self.generated_tokens} tokens, decode {self.decode_tps:.1f} tok/s | peak memory "
                f"{self.peak_memory_bytes / 2**20:.0f} MiB")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class Gemma3LM:
    """A loaded model with its tokenizer: `generate()` returns text, `stream()` yields it as it is made."""

    def __init__(self, model: Gemma3Model, tokenizer: GemmaTokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.last_stats = GenerationStats()

    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            text = self.tokenizer.apply_chat_template(prompt)
        elif chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        else:
            text = prompt
        if not text or not text.strip():
            raise ValueError("the prompt is empty")
        return self.tokenizer.encode(text)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
                     seed: int | None = None, prefill_chunk: int = 0, stop_on_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids; statistics land in self.last_stats."""
        params = (params or SamplingParams()).validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0 = one shot), got {prefill_chunk}")
        total = len(prompt_ids) + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                             f"exceeds the model's context of {self.config.max_position_embeddings} tokens")
        model, device = self.model, self.model.device
        argmax = ops_module.resolve_backend(model.backend, "cpu").argmax  # sampling runs on CPU logits
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        cache = model.new_cache(total)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        seen = ids.clone() if params.repetition_penalty != 1.0 else None

        t0 = time.perf_counter()
        logits = model.prefill(ids, cache, prefill_chunk)
        token = sample(logits[0].cpu(), params, None if seen is None else seen.cpu(), generator, argmax)
        stats.prefill_s = time.perf_counter() - t0

        # Greedy steps return the next token straight from the session (its argmax runs in the same call).
        session = model.decode_session(cache)
        greedy = params.temperature == 0 and seen is None
        t0 = time.perf_counter()
        while True:
            stats.generated_tokens += 1
            stats.token_ids.append(token)
            yield token
            if (stop_on_eos and token in self.tokenizer.stop_ids) or stats.generated_tokens >= max_new_tokens:
                break
            if greedy:
                token = session.greedy(token)
            else:
                if seen is not None:
                    seen = torch.cat((seen, torch.tensor([token], dtype=torch.long, device=device)))
                logits = session.logits(token)
                token = sample(logits[0].cpu(), params, None if seen is None else seen.cpu(), generator, argmax)
            stats.decode_steps += 1
            stats.decode_s = time.perf_counter() - t0
        stats.peak_memory_bytes = peak_memory_bytes(device)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               chat: bool = False, prefill_chunk: int = 0) -> Iterator[str]:
        """Yield the text of the continuation piece by piece (stop tokens are not printed)."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).validate()
        prompt_ids = self.encode_prompt(prompt, chat)
        decoder = self.tokenizer.stream_decoder()
        for token in self.generate_ids(prompt_ids, max_new_tokens, params, seed, prefill_chunk):
            if token in self.tokenizer.stop_ids:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def generate(self, prompt: str | list[dict], **kwargs) -> str:
        """The continuation of `prompt` (a string, or chat messages [{'role', 'content'}]) as one string."""
        return "".join(self.stream(prompt, **kwargs))


def load(model: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
         backend: str = "auto", quiet: bool = True, quantize: str = "none") -> Gemma3LM:
    """Load a Hugging Face folder, a .gguf file, or (model=None) the default Gemma 3 270M. dtype "auto": a GGUF
    runs on its quantized blocks (on the CPU), a folder in float32.

    quantize="int8" stores every linear layer and the output head as int8 with per-row scales."""
    m, tok = load_model_and_tokenizer(model, dtype, device, backend, quiet=quiet, quantize=quantize)
    return Gemma3LM(m, tok)
