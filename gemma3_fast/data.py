"""Training data: text files or JSONL -> token ids in a memmap (tokenized once, reused), and the batch order.

Sources: a .txt file (one document), a folder of .txt/.jsonl files (sorted, recursive), or a .jsonl file whose
lines are objects with a "text" field (one document each). Each document is written as <bos> ids <eos>.
The token file sits in the run's output folder with a fingerprint of its sources and tokenizer; a later run
(or --resume) with the same fingerprint reads it instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
_BATCH_CHARS = 1 << 20  # characters per tokenizer batch: progress moves, memory stays small


class DataError(ValueError):
    """Training data that cannot be used: the message names the file (and line) and what was expected."""


def source_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: the folder holds no .txt or .jsonl files")
        return files
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: expected a .txt file, a .jsonl file with a 'text' field, or a folder of them")
    return [path]


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed object) for each non-blank line; a line that is not JSON is an error naming it."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Every document's text, in order; a .jsonl line without a string 'text' field (or chat 'messages', whose
    contents are joined) is an error naming it."""
    for f in files:
        if f.suffix == ".txt":
            yield f.read_text(encoding="utf-8", errors="replace")
            continue
        for where, obj in read_jsonl(f):
            if isinstance(obj, dict) and isinstance(obj.get("messages"), list):  # chat (tokenizer training)
                yield "\n".join(m["content"] for m in obj["messages"]
                                 if isinstance(m, dict) and isinstance(m.get("content"), str))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{where}: expected an object with a string 'text' field, got "
                                f"{json.dumps(obj)[:80]!r}")
            yield obj["text"]


def fingerprint(files: list[Path], tokenizer_identity: str) -> str:
    h = hashlib.sha256(tokenizer_identity.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tokenize_to_memmap(files: list[Path], tokenizer, out: Path, quiet: bool = False) -> np.memmap:
    """Tokenize the documents of `files` into out (a flat uint16/uint32 array; out.json beside it records the
    fingerprint), or reuse out when its fingerprint matches. Written to a temporary name, then renamed."""
    from tqdm import tqdm

    meta_path = out.with_suffix(".json")
    key = fingerprint(files, tokenizer.identity())
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    if meta_path.is_file() and out.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("fingerprint") == key:
            return np.memmap(out, dtype=meta["dtype"], mode="r")
    total_bytes = sum(f.stat().st_size for f in files)
    tmp = out.with_name(out.name + ".partial")
    count, docs = 0, 0
    name = files[0].parent if len(files) > 1 else files[0].name
    with open(tmp, "wb") as sink, tqdm(total=total_bytes, unit="B", unit_scale=True, disable=quiet,
                                        desc=f"tokenizing {name}") as bar:
        for text in iter_documents(files):
            docs += 1
            ids = [tokenizer.bos_id]
            for piece in _pieces(text):
                ids += tokenizer.encode(piece, add_bos=False)  # the compact tokenizer where it applies: 1.5-2x
                bar.update(len(piece.encode("utf-8", errors="replace")))
            ids.append(tokenizer.eos_id)
            np.asarray(ids, dtype=dtype).tofile(sink)
            count += len(ids)
    if docs == 0 or count <= 2 * docs:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{', '.join(str(f) for f in files[:3])}: no text to train on (the data is empty)")
    os.replace(tmp, out)
    meta_path.write_text(json.dumps({"fingerprint": key, "dtype": np.dtype(dtype).name, "tokens": count,
                                     "documents": docs, "sources": [str(f) for f in files]}))
    return np.memmap(out, dtype=dtype, mode="r")


def _pieces(text: str) -> Iterator[str]:
    """The text cut at line ends into pieces of about _BATCH_CHARS (tokens never span a line end in practice:
    the cut keeps the newline with the line before it)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + _BATCH_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else end
        yield text[start:end]
        start = end


class EpochOrder:
    """Items 0..count-1 visited in a random order per epoch drawn from seed: position p of the endless sequence
    is item _index(p), so a run's data position is one integer and resuming from it replays the same order.
    Subclasses set count and seed."""

    count: int
    seed: int
    _epoch, _order = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.count
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.count, generator=g)
        return int(self._order[position % self.count])


class Windows(EpochOrder):
    """Training windows of seq_len + 1 tokens (inputs and shifted targets) cut from a token array at stride
    seq_len, visited in a random order per epoch drawn from `seed`. Batch i is windows [i*B, (i+1)*B) of that
    endless sequence, so a run's data position is one integer and resuming from it replays the same order.

    Every window starts with <bos> (bos_id): one cut inside a document gets it prepended, so its inputs are
    <bos> + the next seq_len - 1 tokens and its targets those seq_len tokens. Gemma expects <bos> at position 0:
    the pretrained 270M's loss on a story window was 5.6 without it and 3.5 with it."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, name: str = "data", bos_id: int | None = None):
        self.tokens, self.seq_len, self.seed, self.bos_id = tokens, seq_len, seed, bos_id
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise DataError(f"{name}: {len(tokens)} tokens is less than one training window of --seq-len + 1 = "
                            f"{seq_len + 1} tokens; use more data or a smaller --seq-len")

    def window(self, i: int) -> torch.Tensor:
        s = i * self.seq_len
        if self.bos_id is None or self.tokens[s] == self.bos_id:
            return torch.from_numpy(self.tokens[s:s + self.seq_len + 1].astype(np.int64))
        row = np.empty(self.seq_len + 1, dtype=np.int64)
        row[0], row[1:] = self.bos_id, self.tokens[s:s + self.seq_len]
        return torch.from_numpy(row)

    def batch(self, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [batch_size, seq_len] of windows position .. position + batch_size - 1."""
        rows = torch.stack([self.window(self._index(p)) for p in range(position, position + batch_size)])
        return rows[:, :-1], rows[:, 1:]

    def in_order(self, batch_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first windows in file order (validation: the same every time)."""
        n = min(self.count, batch_size * max_batches)
        for s in range(0, n, batch_size):
            rows = torch.stack([self.window(i) for i in range(s, min(n, s + batch_size))])
            yield rows[:, :-1], rows[:, 1:]


def train_tokenizer(files: list[Path], vocab_size: int, out: Path, quiet: bool = False):
    """A byte-level BPE (tokenizers) trained on the documents, with Gemma's special tokens at Gemma's ids
    (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and the chat turn markers. Saved to out (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .tokenizer import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    if vocab_size < 256 + len(specials):
        raise DataError(f"--tokenizer train:{vocab_size}: a byte-level BPE needs a vocabulary of at least "
                        f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=not quiet,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(iter_documents(files), trainer=trainer)
    if tk.get_vocab_size() < vocab_size and not quiet:
        print(f"gemma3_fast.train: the tokenizer stopped at {tk.get_vocab_size()} tokens (asked {vocab_size}): "
              "every word of the data is already one token", file=sys.stderr)
    tmp = out.with_name(out.name + ".partial")
    tk.save(str(tmp))
    os.replace(tmp, out)
    return GemmaTokenizer(tk, source=str(out))
