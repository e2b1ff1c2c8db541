"""`python -m gemma3_fast.convert SRC.gguf OUT_DIR`: write a Hugging Face folder for a Gemma 3 GGUF file."""

from __future__ import annotations

import argparse
import sys

from .loading import convert_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.convert", description=__doc__)
    p.add_argument("src", help="a Gemma 3 .gguf file")
    p.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        out = convert_gguf(args.src, args.out_dir, quiet=args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"gemma3_fast.convert: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
