"""Gemma tokenizer (via `tokenizers`): BOS handling, the chat template, stop tokens, streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .huge_pages import release_freed_memory

# SentencePiece token types as stored in GGUF metadata.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def build_from_sentencepiece_vocab(tokens: list[str], scores: list[float], types: list[int],
                                   unk_token: str = "<unk>") -> Tokenizer:
    """A `tokenizers` BPE equivalent of a SentencePiece BPE vocabulary (as GGUF stores it).

    SentencePiece BPE merges the adjacent pair whose union has the highest score; a BPE merge list ranked
    by that score reproduces it. Ties are broken as transformers' converter breaks them (longer left
    piece first, then longer right piece, then vocabulary order), so both tokenize identically.
    """
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


class GemmaTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self.tk = tokenizer
        self.source = source
        self.bos_id = self._require("<bos>")
        self.eos_id = self._require("<eos>")
        self.end_of_turn_id = tokenizer.token_to_id("<end_of_turn>")
        self.stop_ids = {self.eos_id} | ({self.end_of_turn_id} if self.end_of_turn_id is not None else set())

    def _require(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: the vocabulary has no {token} token")
        return i

    @classmethod
    def from_file(cls, path: str | Path) -> "GemmaTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            tk = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        release_freed_memory()
        return cls(tk, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens are added here, not by the tokenizer's post-processor: a prompt that already
        # starts with <bos> (a chat template, say) keeps exactly one.
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
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
