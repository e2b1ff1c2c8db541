"""The extension's BpeTokenizer against the `tokenizers` library it stands in for: the same ids and text for the
real Gemma tokenizer and for small vocabularies that reach the rare paths (unknown characters, missing byte
tokens, normalized added tokens), and its cache of mapped tables (reused, rebuilt when damaged, skipped for a
tokenizer.json of another kind)."""

from __future__ import annotations

import json
import random

import pytest

from gemma3_fast.ops import EXTENSION_AVAILABLE
from gemma3_fast.tokenizer import GemmaTokenizer, build_from_sentencepiece_vocab, load_compact

pytestmark = pytest.mark.skipif(not EXTENSION_AVAILABLE, reason="BpeTokenizer is part of the compiled extension")

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEMMA3_FAST_CACHE", str(folder))
    return folder / "tokenizers"


def random_texts(pieces: list[str], alphabet: list[str], count: int, seed: int = 0) -> list[str]:
    """Texts made of vocabulary pieces, runs of spaces and newlines, and characters (some outside the vocabulary)."""
    rng = random.Random(seed)
    texts = ["", " ", "  ", "\n", "a  b", " leading", "trailing ", "\u2581 marker", "x" * 300]
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(pieces))
            elif r < 0.45:
                parts.append(" " * rng.randint(1, 5))
            elif r < 0.5:
                parts.append("\n" * rng.randint(1, 4))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
        texts.append("".join(parts))
    return texts


def assert_same(tok: GemmaTokenizer, hf, texts: list[str], n_ids: int, seed: int = 0) -> None:
    assert tok.compact is not None
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.compact.encode(text) == ids, text
        for skip in (True, False):
            assert tok.compact.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids
    # Arbitrary id sequences: byte tokens that make invalid UTF-8, special tokens, ids outside the vocabulary.
    rng = random.Random(seed)
    for _ in range(500):
        ids = [rng.randrange(-2, n_ids + 3) if rng.random() < 0.5 else rng.randrange(0, min(n_ids, 300))
               for _ in range(rng.randint(0, 16))]
        for skip in (True, False):
            assert tok.compact.decode(ids, skip) == hf.decode([i for i in ids if i >= 0], skip_special_tokens=skip)


def toy_vocab(with_all_bytes: bool) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary (as a GGUF stores one): control tokens, <unk>, byte tokens (all, or
    only some, so that unknown characters fall to <unk>), user-defined pieces (one with the word marker, which
    tokenizers matches after normalization), and merged pieces whose scores tie."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [_CONTROL, _CONTROL, _CONTROL, _UNKNOWN, _CONTROL, _CONTROL]
    byte_values = range(256) if with_all_bytes else [b for b in range(256) if b not in (0xC3, 0xE4, 0xF0)]
    tokens += [f"<0x{b:02X}>" for b in byte_values]
    types += [_BYTE] * len(byte_values)
    tokens += ["\n\n", "<tab>", "\u2581\u2581"]
    types += [_USER_DEFINED] * 3
    chars = list("abcdeΩ\u2581\n") + ["é"]
    words = ["ab", "bc", "abc", "cd", "bcd", "abcd", "\u2581a", "\u2581ab", "\u2581abc", "de", "ea", "Ωa", "aΩ",
             "\u2581Ω", "dd", "ddd", "dddd", "éa"]
    tokens += chars + words
    types += [_NORMAL] * (len(chars) + len(words))
    rng = random.Random(1)
    scores = [0.0] * (len(tokens) - len(words)) + [float(rng.choice([-1, -2, -3])) for _ in words]  # many ties
    return tokens, scores, types


@pytest.mark.parametrize("with_all_bytes", [True, False])
def test_toy_vocabulary_matches_tokenizers(cache, tmp_path, with_all_bytes):
    tokens, scores, types = toy_vocab(with_all_bytes)
    hf = build_from_sentencepiece_vocab(tokens, scores, types)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = GemmaTokenizer.from_file(path)
    alphabet = list("abcdeΩé \n\t") + ["\u2581", "你", "🦙", "ä"]  # the last three are not in the vocabulary
    texts = random_texts([t for t, ty in zip(tokens, types) if ty != _BYTE], alphabet, 1500)
    assert_same(tok, hf, texts, len(tokens))
    if not with_all_bytes:  # the unknown-character path was reached
        assert any(3 in hf.encode(t, add_special_tokens=False).ids for t in texts)


def test_real_tokenizer_matches_tokenizers(default_folder):
    from tokenizers import Tokenizer

    path = default_folder / "tokenizer.json"
    tok = GemmaTokenizer.from_file(path)
    hf = Tokenizer.from_file(str(path))
    vocab = list(hf.get_vocab())
    chars = [chr(c) for c in list(range(32, 127)) * 3 + list(range(0x80, 0x800, 3))] + \
        ["你", "好", "🤗", "🦙", "\u2581", "\t", "\r", "\x00", "\ufffd", "\U0010fffd"]
    texts = random_texts(vocab, chars, 600) + [
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<unused12> <pad><bos>",
        "héllo wörld 你好 🤗🦙 \t\t tab\n\n\n\n", "   three spaces then\n\n\ntext"]
    assert_same(tok, hf, texts, hf.get_vocab_size())
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.token_to_id("<start_of_turn>") == hf.token_to_id("<start_of_turn>")
    assert tok.token_to_id("no such token") is None


def test_tables_are_mapped_from_the_cache(cache, tmp_path):
    tokens, scores, types = toy_vocab(True)
    path = tmp_path / "tokenizer.json"
    build_from_sentencepiece_vocab(tokens, scores, types).save(str(path))
    first = GemmaTokenizer.from_file(path)
    assert first.compact.mapped  # the first load writes the tables, then maps them as later loads do
    entries = list(cache.glob("*.bpe"))
    assert len(entries) == 1
    # A copy of the same file (a checkpoint's tokenizer.json) shares the entry: the key is the contents.
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    second = GemmaTokenizer.from_file(copy)
    assert second.compact.mapped and second.compact.memory_bytes < 64 * 1024
    assert list(cache.glob("*.bpe")) == entries
    text = "abcd \u2581ab<tab>\n\nΩa é"
    assert second.encode(text) == first.encode(text)


def test_damaged_cache_is_rebuilt(cache, tmp_path):
    tokens, scores, types = toy_vocab(True)
    hf = build_from_sentencepiece_vocab(tokens, scores, types)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    GemmaTokenizer.from_file(path)
    (entry,) = cache.glob("*.bpe")
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"XXXX" + b[4:], lambda b: b""):
        entry.write_bytes(damage(entry.read_bytes()))
        tok = GemmaTokenizer.from_file(path)
        assert tok.compact is not None and tok.compact.mapped
        assert tok.encode("abcd dd ddd", add_bos=False) == hf.encode("abcd dd ddd", add_special_tokens=False).ids


def test_other_tokenizers_use_the_tokenizers_library(cache, tmp_path):
    """A tokenizer.json BpeTokenizer does not implement (here WordLevel, the tiny model's) runs on tokenizers,
    and the cache records that so later loads skip the check."""
    from tests.conftest import write_tokenizer

    path = tmp_path / "tokenizer.json"
    write_tokenizer(path, 64)
    tok = GemmaTokenizer.from_file(path)
    assert tok.compact is None
    assert tok.encode("w3 w4") == [tok.bos_id, tok.tk.token_to_id("w3"), tok.tk.token_to_id("w4")]
    assert load_compact(path) is None and len(list(cache.glob("*.bpe"))) == 1


def test_unwritable_cache_still_gives_the_compact_tokenizer(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("GEMMA3_FAST_CACHE", str(blocker))
    tokens, scores, types = toy_vocab(True)
    path = tmp_path / "tokenizer.json"
    build_from_sentencepiece_vocab(tokens, scores, types).save(str(path))
    tok = GemmaTokenizer.from_file(path)
    assert tok.compact is not None and not tok.compact.mapped
    assert tok.decode(tok.encode("abc dd")) == "abc dd"


def test_malformed_tokenizer_json_names_the_file(cache, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        GemmaTokenizer.from_file(path)


def test_tokenizers_object_is_made_on_first_use(cache, tmp_path):
    tokens, scores, types = toy_vocab(True)
    path = tmp_path / "tokenizer.json"
    build_from_sentencepiece_vocab(tokens, scores, types).save(str(path))
    tok = GemmaTokenizer.from_file(path)
    assert tok._tk is None
    assert tok.tk.encode("abcd", add_special_tokens=False).ids == tok.encode("abcd", add_bos=False)


@pytest.mark.parametrize("damage", ["merge without a space", "vocab as a list", "added token as a string"])
def test_odd_tokenizer_json_is_left_to_tokenizers(cache, tmp_path, damage):
    """A tokenizer.json whose fields have unexpected types is not BpeTokenizer's to judge: tokenizers reads it or
    names the problem, as it did before BpeTokenizer existed."""
    tokens, scores, types = toy_vocab(True)
    path = tmp_path / "tokenizer.json"
    build_from_sentencepiece_vocab(tokens, scores, types).save(str(path))
    spec = json.loads(path.read_text())
    if damage == "merge without a space":
        spec["model"]["merges"] = ["abc"] + [" ".join(m) for m in spec["model"]["merges"]]
    elif damage == "vocab as a list":
        spec["model"]["vocab"] = list(spec["model"]["vocab"])
    else:
        spec["added_tokens"] = ["<bos>"]
    path.write_text(json.dumps(spec))
    assert load_compact(path) is None
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        GemmaTokenizer.from_file(path)


def test_training_data_is_tokenized_by_the_compact_tokenizer(cache, tmp_path):
    """data.tokenize_to_memmap encodes with the compact tokenizer when it applies: the ids tokenizers gives,
    documents framed by <bos> ... <eos>, `.tk` never made; the cache key is the tokenizer.json's contents, so a
    copy of the file reuses the tokens and another vocabulary does not."""
    import numpy as np

    from gemma3_fast.data import tokenize_to_memmap

    tokens, scores, types = toy_vocab(True)
    hf = build_from_sentencepiece_vocab(tokens, scores, types)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    texts = random_texts([t for t, ty in zip(tokens, types) if ty != _BYTE], list("abcdeΩé \n") + ["你"], 40)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    tok = GemmaTokenizer.from_file(path)
    assert tok.compact is not None
    out = tokenize_to_memmap([data], tok, tmp_path / "train.bin", quiet=True)
    assert tok._tk is None
    expected = []
    for t in (t for t in texts if t.strip()):
        expected += [tok.bos_id] + hf.encode(t, add_special_tokens=False).ids + [tok.eos_id]
    assert np.asarray(out).tolist() == expected

    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert GemmaTokenizer.from_file(copy).identity() == tok.identity()
    other = build_from_sentencepiece_vocab(tokens, [s - (i == len(tokens) - 1) for i, s in enumerate(scores)], types)
    other_path = tmp_path / "other" / "tokenizer.json"
    other_path.parent.mkdir()
    other.save(str(other_path))
    assert GemmaTokenizer.from_file(other_path).identity() != tok.identity()
