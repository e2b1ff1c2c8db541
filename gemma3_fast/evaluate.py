"""`python -m gemma3_fast.evaluate`: what a fine-tuned model learned, on held-out chat examples.

    python -m gemma3_fast.evaluate --model runs/extract/best --data data/extract/val.jsonl

For each {"messages": [...]} line, the model generates the last assistant turn (greedy, from the messages
before it, rendered with the chat template `generate --chat` and training use) and the answer is compared with
the reference: exact match (after stripping surrounding whitespace), and, where the reference is a JSON
object, field-level accuracy (the share of the reference's fields that the answer, parsed as JSON, has with
equal values; an answer that is not JSON scores 0 on its fields). Also the validation loss: the mean
cross-entropy of the reference's assistant tokens, the quantity training reports as val_loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from .data import DataError, read_jsonl


def read_tasks(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) per line: the last message must be the assistant's."""
    from .sft import check_messages

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    tasks = []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict) or "messages" not in obj:
            raise DataError(f"{where}: expected an object with 'messages' (a chat example)")
        messages = check_messages(obj["messages"], where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer to compare with")
        tasks.append((messages[:-1], messages[-1]["content"]))
    if not tasks:
        raise DataError(f"{path}: no examples")
    return tasks


def field_scores(answer: str, reference: str) -> tuple[int, int] | None:
    """(fields right, fields in the reference) when the reference is a JSON object, else None."""
    try:
        ref = json.loads(reference)
    except json.JSONDecodeError:
        return None
    if not isinstance(ref, dict) or not ref:
        return None
    try:
        got = json.loads(answer)
    except json.JSONDecodeError:
        got = None
    if not isinstance(got, dict):
        return 0, len(ref)
    return sum(1 for k, v in ref.items() if k in got and got[k] == v), len(ref)


def validation_loss(lm, path: Path, quiet: bool) -> float:
    from .sft import PackedExamples, read_examples
    from .train import loss_sums

    seq_len = min(lm.config.max_position_embeddings, 4096)
    data = PackedExamples(read_examples([path], lm.tokenizer, seq_len, quiet, str(path)), seq_len, 0, str(path))
    total, n = loss_sums(lm.model, data.in_order(1, data.count))
    return total / max(n, 1)


def evaluate(lm, path: Path, limit: int | None = None, max_new_tokens: int = 128, quiet: bool = False) -> dict:
    from tqdm import tqdm

    tasks = read_tasks(path)[:limit]
    exact, right, fields, results = 0, 0, 0, []
    for prompt, reference in tqdm(tasks, desc="generating", unit="example", disable=quiet):
        answer = lm.generate(prompt, max_new_tokens=max_new_tokens).strip()
        ok = answer == reference.strip()
        exact += ok
        scores = field_scores(answer, reference)
        if scores is not None:
            right, fields = right + scores[0], fields + scores[1]
        results.append({"prompt": prompt[-1]["content"], "reference": reference, "answer": answer, "exact": ok})
    out = {"examples": len(tasks), "exact_match": exact / len(tasks), "results": results,
           "val_loss": validation_loss(lm, path, quiet)}
    if fields:
        out["field_accuracy"] = right / fields
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="a Hugging Face folder (e.g. a training run's best/), a .gguf, or 'default'")
    p.add_argument("--data", required=True, help="a .jsonl of chat examples whose last message is the answer")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer generated")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "extension", "reference"])
    p.add_argument("--show", type=int, default=3, help="print this many wrong answers")
    p.add_argument("--json", help="also write every answer and the scores here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    from .config import ConfigError
    from .generation import load
    from .weights import WeightsError

    try:
        lm = load(None if a.model == "default" else a.model, dtype=a.dtype, backend=a.backend, quiet=a.quiet)
        res = evaluate(lm, Path(a.data), a.limit, a.max_new_tokens, a.quiet)
    except (DataError, ConfigError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f"gemma3_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    wrong = [r for r in res["results"] if not r["exact"]]
    for r in wrong[:a.show]:
        print(f"--- wrong answer\nprompt:    {r['prompt'][-120:]!r}\nreference: {r['reference']}\nanswer:    "
              f"{r['answer']}")
    print(f"model {a.model}, {res['examples']} examples of {a.data}")
    print(f"exact match: {res['exact_match']:.3f} ({res['examples'] - len(wrong)}/{res['examples']})")
    if "field_accuracy" in res:
        print(f"JSON field accuracy: {res['field_accuracy']:.3f}")
    print(f"validation loss (assistant tokens): {res['val_loss']:.4f}")
    if a.json:
        tmp = Path(a.json + ".partial")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
