"""`python -m gemma3_fast.generate`: write text with Gemma 3 (default: the embedded 270M model)."""

from __future__ import annotations

import argparse
import sys

from .generation import load
from .ops import set_gguf_activations
from .sampling import SamplingParams

DEFAULT_PROMPT = "The three most important inventions in human history are"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.generate", description=__doc__)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text, or '-' to read it from stdin")
    p.add_argument("--max-new-tokens", "--max_tokens", "--max-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="in [0, 1); 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--model", "--model_path", "--model-path", dest="model", default=None,
                   help="Hugging Face folder (e.g. a gemma3_fast.train output) or .gguf file (default: Gemma 3 270M)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: a GGUF runs on its own quantized blocks (CPU), anything else in float32; float32 / "
                        "bfloat16 dequantize a GGUF; float16 is refused: Gemma 3 overflows it")
    p.add_argument("--gguf-activations", default="fp32", choices=["fp32", "int16"],
                   help="GGUF blocks' decode: fp32 activations (exact, default) or int16 (~1.1x faster decode)")
    p.add_argument("--backend", default="auto", choices=["auto", "extension", "reference"],
                   help="extension = compiled C++/CUDA kernels, reference = pure PyTorch")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 (per-row scales) for all linear layers and the output head")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template (-it models)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prefill in chunks of N tokens (0 = one shot)")
    p.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty).validate()
    except ValueError as e:
        parser.error(str(e).replace("_", "-", 1))
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.dtype == "float16":
        parser.error("--dtype float16 is not supported: Gemma 3 activations overflow fp16; use float32 or bfloat16")
    # stdin as bytes: text that is not UTF-8 gets U+FFFD for its bad bytes (a str with surrogate escapes, what
    # sys.stdin gives, made the tokenizer raise a TypeError).
    prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace") if args.prompt == "-" else args.prompt
    if not prompt.strip():
        parser.error("the prompt is empty")

    try:
        set_gguf_activations(args.gguf_activations)
        lm = load(args.model, args.dtype, args.device, args.backend, quiet=False, quantize=args.quantize)
        # The context check before the prompt is echoed: an error comes alone, not after the prompt's text.
        total = len(lm.encode_prompt(prompt, args.chat)) + args.max_new_tokens
        if total > lm.config.max_position_embeddings:
            raise ValueError(f"the prompt and --max-new-tokens {args.max_new_tokens} need {total} positions, which "
                             f"exceeds the model's context of {lm.config.max_position_embeddings} tokens")
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                      seed=args.seed, chat=args.chat, prefill_chunk=args.prefill_chunk)
        if not args.chat:
            print(prompt, end="", flush=True)
        if args.no_stream:
            print(lm.generate(prompt, **kwargs), flush=True)
        else:
            for piece in lm.stream(prompt, **kwargs):
                print(piece, end="", flush=True)
            print(flush=True)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"gemma3_fast: error: {e}", file=sys.stderr)
        return 1
    stats = lm.last_stats
    quant = ", int8 weights" if args.quantize == "int8" else ""
    weights = "GGUF blocks" if lm.model.gguf_blocks else str(lm.model.dtype).replace("torch.", "")
    print(f"[{lm.model.ops.name} backend, {weights}{quant}, {lm.model.device}] {stats.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
