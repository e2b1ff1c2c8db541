"""Supervised fine-tuning data: chat examples -> token ids with a loss mask, packed into training rows.

A .jsonl line {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} is rendered with the
chat template `generate --chat` uses (GemmaTokenizer.apply_chat_template: one <bos>, turns as
<start_of_turn>user|model ... <end_of_turn>), encoded once as a whole, and only the assistant turns' tokens and
their <end_of_turn> are counted in the loss (found from the tokens' character offsets, so the ids are exactly
the ones the model sees at inference). A {"text": ...} line in the same data is trained on every token.

Examples are packed (best fit, longest first) into rows of at most --seq-len input tokens. Each example keeps
its own positions (from 0) and attends only to itself: the model gets the row's segment lengths
(Gemma3Model.loss(..., seq_lens=...)), so packing changes no example's logits.
"""

from __future__ import annotations

import bisect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError, EpochOrder, read_jsonl
from .loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


def is_chat_data(files: list[Path]) -> bool:
    """True when any .jsonl line of `files` holds 'messages' (the data is then read as SFT examples)."""
    for f in files:
        if f.suffix != ".jsonl":
            continue
        with f.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # reported with its line number when the examples are read
                    if isinstance(obj, dict) and "messages" in obj:
                        return True
    return False


def check_messages(messages, where: str) -> list[dict]:
    """The messages of one example, checked: a non-empty list of {role, content} with known roles, at least one
    assistant turn, and no empty assistant turn. Errors name `where` (file:line)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', got "
                            f"{json.dumps(m)[:80]}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i} is an empty assistant turn (nothing to learn from)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (the loss counts only assistant turns)")
    return messages


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, counted): the chat rendering of `messages` with its <bos>, and per token whether the loss counts it
    (the assistant turns' content tokens and their <end_of_turn>)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    # The character spans of the assistant turns' content and their <end_of_turn>, in the rendered text.
    spans, pos = [], 0
    for m in messages:
        if m["role"] == "system":
            continue
        header = "<start_of_turn>" + ("user" if m["role"] == "user" else "model") + "\n"
        start = text.index(header, pos) + len(header)
        end = text.index("<end_of_turn>", start) + len("<end_of_turn>")
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end
    enc = tokenizer.tk.encode(text, add_special_tokens=False)
    ids, counted = [tokenizer.bos_id], [False]
    for tid, (a, b) in zip(enc.ids, enc.offsets):
        ids.append(tid)
        counted.append(any(s <= a and b <= e for s, e in spans) and b > a)
    return ids, counted


@dataclass
class Example:
    ids: np.ndarray       # [L] token ids, <bos> first
    targets: np.ndarray   # [L - 1] the next token where counted, else IGNORE_INDEX

    @property
    def length(self) -> int:  # input tokens
        return len(self.targets)


def make_example(ids: list[int], counted: list[bool]) -> Example:
    ids_a = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(counted[1:]), ids_a[1:], IGNORE_INDEX)
    return Example(ids_a, targets)


def read_examples(files: list[Path], tokenizer, seq_len: int, quiet: bool = False, name: str = "data") -> list[Example]:
    """Every line of `files` as an Example: 'messages' lines with the assistant mask, 'text' lines (and .txt files)
    counted whole. Examples longer than seq_len + 1 tokens are truncated, with one warning that counts them."""
    from tqdm import tqdm

    examples, read, truncated, emptied, longest = [], 0, 0, 0, 0
    for f in tqdm(files, desc=f"reading {name}", disable=quiet or len(files) < 2):
        rows = [(f"{f}", {"text": f.read_text(encoding="utf-8", errors="replace")})] if f.suffix == ".txt" \
            else read_jsonl(f)
        for where, obj in rows:
            if isinstance(obj, dict) and "messages" in obj:
                ids, counted = render(tokenizer, check_messages(obj["messages"], where))
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                ids = tokenizer.encode(obj["text"]) + [tokenizer.eos_id]
                counted = [False] + [True] * (len(ids) - 1)
            else:
                raise DataError(f"{where}: expected an object with 'messages' (a chat example) or a string 'text'")
            read += 1
            if len(ids) > seq_len + 1:
                truncated += 1
                longest = max(longest, len(ids))
                ids, counted = ids[:seq_len + 1], counted[:seq_len + 1]
            if any(counted[1:]):
                examples.append(make_example(ids, counted))
            else:  # the cut removed every counted token (a long prompt): nothing left to learn from
                emptied += 1
    if truncated and not quiet:
        left_out = f"; {emptied} of them lost their whole answer and were left out" if emptied else ""
        print(f"gemma3_fast.train: warning: {truncated} of {read} examples of {name} are longer than "
              f"--seq-len + 1 = {seq_len + 1} tokens and were truncated (the longest: {longest} tokens){left_out}; "
              "raise --seq-len to keep them whole", file=sys.stderr)
    if not examples:
        raise DataError(f"{name}: no examples with tokens to train on")
    return examples


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into bins of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


class PackedExamples(EpochOrder):
    """SFT examples packed into rows of at most seq_len input tokens, visited in a random order per epoch drawn
    from `seed`, as data.Windows is: batch i is rows [i*B, (i+1)*B) of that endless sequence, so a run's data
    position is one integer. A batch is (ids [1, N], targets [1, N], seq_lens): its rows' examples end to end,
    each example one segment."""

    def __init__(self, examples: list[Example], seq_len: int, seed: int, name: str = "data"):
        if not examples:
            raise DataError(f"{name}: no examples")
        self.examples, self.seq_len, self.seed = examples, seq_len, seed
        self.rows = pack([e.length for e in examples], seq_len)
        self.count = len(self.rows)
        self.tokens = sum(e.length for e in examples)

    def _gather(self, rows: list[int]):
        parts = [self.examples[i] for r in rows for i in self.rows[r]]
        ids = torch.from_numpy(np.concatenate([e.ids[:-1] for e in parts]))[None]
        targets = torch.from_numpy(np.concatenate([e.targets for e in parts]))[None]
        return ids, targets, [e.length for e in parts]

    def batch(self, position: int, batch_size: int):
        return self._gather([self._index(p) for p in range(position, position + batch_size)])

    def in_order(self, batch_size: int, max_batches: int) -> Iterator[tuple]:
        """The first rows in packing order (validation: the same every time)."""
        n = min(self.count, batch_size * max_batches)
        for s in range(0, n, batch_size):
            yield self._gather(list(range(s, min(n, s + batch_size))))
