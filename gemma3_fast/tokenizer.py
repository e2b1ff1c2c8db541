"""Gemma tokenizer: BOS handling, the chat template, stop tokens, streaming decode.

Encoding and decoding run on the extension's BpeTokenizer (csrc/bpe_tokenizer.h) when the tokenizer.json has the
shape it implements (Gemma's: see `compact_arrays`), else on the `tokenizers` library. Both give the same ids and
text (tests/test_tokenizer.py holds them together). The compact one maps ~14 MB of tables, of which a run touches
1-3 MiB, where `tokenizers` keeps ~76 MiB; it starts in milliseconds from its cached tables, where `tokenizers`
parses 33 MB of JSON (~1 s).
The `tokenizers` object is still made, on first use of `.tk`, for what needs it (SFT's offsets, saving).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from .huge_pages import drop_from_page_cache, release_freed_memory

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# SentencePiece token types as stored in GGUF metadata.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def build_from_sentencepiece_vocab(tokens: list[str], scores: list[float], types: list[int],
                                   unk_token: str = "<unk>") -> "Tokenizer":
    """A `tokenizers` BPE equivalent of a SentencePiece BPE vocabulary (as GGUF stores it).

    SentencePiece BPE merges the adjacent pair whose union has the highest score; a BPE merge list ranked
    by that score reproduces it. Ties are broken as transformers' converter breaks them (longer left
    piece first, then longer right piece, then vocabulary order), so both tokenize identically.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(tokens)}
    mergeable = {tok for tok, ty in zip(tokens, types) if ty == _NORMAL}
    candidates = []  # (score, len(left), len(right), order, left, right)
    for tok, score, ty in zip(tokens, scores, types):
        if ty != _NORMAL:
            continue
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in mergeable and tok[i:] in mergeable]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        for left, right in local:
            candidates.append((score, len(left), len(right), len(candidates), left, right))
    # Highest score first; within equal keys, the first-generated first (a stable order).
    candidates.sort(key=lambda c: (-c[0], -c[1], -c[2], c[3]))
    merges = [(c[4], c[5]) for c in candidates]

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens (<bos>, <start_of_turn>, ...) and user-defined pieces ("\n\n", "<table>") match whole.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized="\u2581" in t)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tk


# Part of the cache key, with the extension's own table-file version (BpeTokenizer.FILE_VERSION): bump it when
# compact_arrays changes what it accepts or makes.
COMPACT_FORMAT = 4
_METASPACE = "\u2581"
_SUPPORTED_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": _METASPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}


def compact_arrays(spec: dict) -> dict | None:
    """BpeTokenizer's constructor arguments for a parsed tokenizer.json, or None when it is not of the kind BpeTokenizer
    implements exactly: a BPE model (no dropout, no subword prefix or suffix, merges not ignored), the normalizer
    Replace(" ", "▁") alone, no pre-tokenizer or a Split on " " (a no-op once spaces are gone), the decoder
    Replace("▁", " ") + ByteFallback + Fuse, and added tokens that are vocabulary entries matched whole (no
    lstrip, rstrip or single_word)."""
    model = spec.get("model") or {}
    if (model.get("type") != "BPE" or model.get("dropout") is not None or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("ignore_merges")):
        return None
    if spec.get("normalizer") != {"type": "Replace", "pattern": {"String": " "}, "content": _METASPACE}:
        return None
    pre = spec.get("pre_tokenizer")
    if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}
                                and not pre.get("invert")):
        return None
    if spec.get("decoder") != _SUPPORTED_DECODER:
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        if not (isinstance(i, int) and 0 <= i < len(tokens)) or tokens[i]:
            return None  # ids not dense 0..n-1
        tokens[i] = tok
    if any(not t for t in tokens):
        return None
    added_ids, added_flags = [], []
    for a in spec.get("added_tokens") or []:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            return None
        i = a.get("id")
        if not (isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] == a.get("content")):
            return None
        added_ids.append(i)
        added_flags.append((1 if a.get("special") else 0) | (2 if a.get("normalized") else 0))
    merges = []
    for m in model.get("merges") or []:
        left, right = m if isinstance(m, list) else m.split(" ", 1)  # newer files: pairs; older: "left right"
        # (a malformed entry raises ValueError or TypeError here: load_compact leaves the file to tokenizers)
        if left not in vocab or right not in vocab or (left + right) not in vocab:
            return None  # tokenizers refuses such a file; let it say why
        merges.append((vocab[left], vocab[right]))
    encoded = [t.encode() for t in tokens]
    offsets = [0]
    for t in encoded:
        offsets.append(offsets[-1] + len(t))
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        return None
    return {
        "blob": torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "merges": torch.tensor(merges, dtype=torch.int32).reshape(-1, 2),
        "added_ids": torch.tensor(added_ids, dtype=torch.int32),
        "added_flags": torch.tensor(added_flags, dtype=torch.int32),
        "unk_id": vocab[unk] if unk is not None else -1,
        "fuse_unk": bool(model.get("fuse_unk")),
        "byte_fallback": bool(model.get("byte_fallback")),
    }


def _file_digest(path: Path, h) -> str:
    """h (a hashlib object) updated with the file, read a MiB at a time (33 MB for Gemma: ~25 ms)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _content_key(path: Path, file_version: int) -> str:
    """A digest of the file and of the formats' versions."""
    return _file_digest(path, hashlib.sha1(f"bpe{COMPACT_FORMAT}.{file_version}|".encode()))[:24]


_NOT_COMPACT = b"not a BpeTokenizer kind\n"  # the cache's record of a tokenizer.json BpeTokenizer cannot take


def load_compact(path: Path):
    """The extension's BpeTokenizer for a tokenizer.json, or None (no extension, or a tokenizer.json of another
    kind). Its tables are cached (~14 MB) beside the GGUF tokenizers, keyed by the file's contents (every
    checkpoint that copies a tokenizer.json shares one entry), and mapped from there: later loads skip the JSON
    (~25 ms, the digest, against 1.1 s). A cache that cannot be written costs the parse next time, and the tables
    stay in memory."""
    from .ops import EXTENSION_AVAILABLE, native_module
    if not EXTENSION_AVAILABLE:
        return None
    from .checkpoint import atomic_write
    from .loading import cache_dir
    bpe = native_module().BpeTokenizer
    cached = cache_dir() / "tokenizers" / f"{_content_key(path, bpe.FILE_VERSION)}.bpe"
    if cached.is_file():
        try:
            if cached.stat().st_size == len(_NOT_COMPACT) and cached.read_bytes() == _NOT_COMPACT:
                return None
            return bpe.load(str(cached))
        except (OSError, RuntimeError):
            pass  # a damaged cache entry: rebuilt below
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    try:
        arrays = compact_arrays(spec) if isinstance(spec, dict) else None
    except (AttributeError, TypeError, ValueError):
        arrays = None  # fields of unexpected types: tokenizers reads it (or says what is wrong)
    del spec
    try:
        tokenizer = bpe(**arrays) if arrays is not None else None
    except RuntimeError:
        tokenizer = None  # inconsistent for BpeTokenizer: tokenizers reads it (or says why not)
    del arrays
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if tokenizer is None:
            atomic_write(cached, lambda p: p.write_bytes(_NOT_COMPACT))
            return None
        atomic_write(cached, lambda p: tokenizer.save(str(p)))
        drop_from_page_cache(cached)  # then a run maps only the pages it touches (MADV_RANDOM): ~1 MiB
        return bpe.load(str(cached))  # mapped, as later runs have it; the built tables are freed
    except (OSError, RuntimeError):
        return tokenizer


class GemmaTokenizer:
    def __init__(self, tokenizer: "Tokenizer | None" = None, source: str = "tokenizer", *, compact=None,
                 path: str | Path | None = None):
        """tokenizer: a `tokenizers.Tokenizer`; or compact (an extension BpeTokenizer) and path (its tokenizer.json,
        read into a `tokenizers.Tokenizer` when `.tk` is first used)."""
        if tokenizer is None and (compact is None or path is None):
            raise ValueError("GemmaTokenizer needs a tokenizers.Tokenizer, or a BpeTokenizer and its file's path")
        self._tk = tokenizer
        self.compact = compact
        self.path = Path(path) if path is not None else None
        self.source = source
        self.bos_id = self._require("<bos>")
        self.eos_id = self._require("<eos>")
        self.end_of_turn_id = self.token_to_id("<end_of_turn>")
        self.stop_ids = {self.eos_id} | ({self.end_of_turn_id} if self.end_of_turn_id is not None else set())

    @property
    def tk(self) -> "Tokenizer":
        """The `tokenizers` object (made on first use when the compact one does the encoding)."""
        if self._tk is None:
            from tokenizers import Tokenizer
            self._tk = Tokenizer.from_file(str(self.path))
        return self._tk

    def token_to_id(self, token: str) -> int | None:
        return (self.compact if self.compact is not None else self.tk).token_to_id(token)

    def _require(self, token: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: the vocabulary has no {token} token")
        return i

    @classmethod
    def from_file(cls, path: str | Path) -> "GemmaTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        compact = load_compact(path)
        release_freed_memory()  # the arrays it was made from (or the JSON it parsed)
        if compact is not None:
            return cls(source=str(path), compact=compact, path=path)
        from tokenizers import Tokenizer
        try:
            tk = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        release_freed_memory()
        return cls(tk, source=str(path))

    def identity(self) -> str:
        """A digest that changes when the ids this tokenizer gives could (cached token files are keyed by it,
        data.fingerprint): of its tokenizer.json's bytes when it is the compact tokenizer of one (hashed, not parsed:
        `.tk` is not made for it), else of its serialization."""
        if self.path is not None:
            return _file_digest(self.path, hashlib.sha256(b"tokenizer.json|"))
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        if self.compact is not None:
            return self.compact.vocab_size
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens are added here, not by the tokenizer's post-processor: a prompt that already
        # starts with <bos> (a chat template, say) keeps exactly one.
        if self.compact is not None:
            ids = self.compact.encode(text)
        else:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.compact is not None:
            return self.compact.decode(list(ids), skip_special_tokens)
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Gemma's turn format. 'assistant' is written 'model'; a system message is prepended to the first
        user turn (Gemma has no system role). No <bos> here: encode() adds the single one."""
        out, system = [], ""
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                system = content + "\n\n"
                continue
            if role not in ("user", "assistant", "model"):
                raise ValueError(f"chat message role must be system, user or assistant, got {role!r}")
            if role == "user":
                content, system = system + content, ""
            out.append(f"<start_of_turn>{'model' if role != 'user' else 'user'}\n{content.strip()}<end_of_turn>\n")
        if add_generation_prompt:
            out.append("<start_of_turn>model\n")
        return "".join(out)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of ids into text increments.

    Decoding ids one by one loses SentencePiece's leading spaces and splits multi-byte characters, so each step
    decodes a short window, from the last emitted boundary to the end, and emits what the newest ids added
    (held back while a character is incomplete). The window keeps the cost per token constant.
    """

    def __init__(self, tokenizer: GemmaTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: the ids before it are already printed
        self.read_offset = 0  # the ids before this one have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        printed = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        if len(text) <= len(printed) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new, or a byte-fallback sequence not finished yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(printed):]
