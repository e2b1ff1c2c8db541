"""Read a llama.cpp GGUF file of Gemma 3: config, dequantized tensors (HF names, HF conventions), tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .config import Gemma3Config
from .tokenizer import build_from_sentencepiece_vocab
from .weights import WeightsError

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


class GGUFFile:
    """A Gemma 3 GGUF opened for reading (memory-mapped: tensors are dequantized one by one)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise WeightsError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = self.field("general.architecture")
        if arch != "gemma3":
            raise WeightsError(f"{self.path}: architecture is {arch!r}, expected 'gemma3'")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._gguf_name = {hf_name(g): g for g in self.tensors if hf_name(g) is not None}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> Gemma3Config:
        a = "gemma3."
        need = {"embedding_length": None, "block_count": None, "feed_forward_length": None,
                "attention.head_count": None, "attention.head_count_kv": None}
        for k in need:
            need[k] = self.field(a + k)
            if need[k] is None:
                raise WeightsError(f"{self.path}: metadata key {a + k} missing")
        heads = need["attention.head_count"]
        head_dim = self.field(a + "attention.key_length", need["embedding_length"] // heads)
        vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        return Gemma3Config(
            vocab_size=vocab,
            hidden_size=need["embedding_length"],
            intermediate_size=need["feed_forward_length"],
            num_hidden_layers=need["block_count"],
            num_attention_heads=heads,
            num_key_value_heads=need["attention.head_count_kv"],
            head_dim=head_dim,
            rms_norm_eps=float(self.field(a + "attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta_global=float(self.field(a + "rope.freq_base", 1e6)),
            rope_theta_local=10_000.0,  # GGUF stores only the global base
            sliding_window=int(self.field(a + "attention.sliding_window", 512)),
            query_pre_attn_scalar=float(head_dim),  # not stored; equals head_dim for 270M/1B/4B/12B
            max_position_embeddings=int(self.field(a + "context_length", 32768)),
            bos_token_id=int(self.field("tokenizer.ggml.bos_token_id", 2)),
            eos_token_id=int(self.field("tokenizer.ggml.eos_token_id", 1)),
            pad_token_id=int(self.field("tokenizer.ggml.padding_token_id", 0)),
        )

    def tensor_names(self) -> list[str]:
        """HF names of the tensors this file holds."""
        return list(self._gguf_name)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its HF name, dequantized to fp32, in HF conventions (norms without Gemma's +1)."""
        from gguf.quants import dequantize

        gname = self._gguf_name[name]
        t = self.tensors[gname]
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"{self.path}: tensor {gname!r} has quantization type {t.tensor_type.name}, which "
                               "the gguf package cannot dequantize") from None
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        arr = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        out = torch.from_numpy(arr.copy())
        if name.endswith("norm.weight"):
            out -= 1.0  # llama.cpp stores Gemma norms as (1 + w)
        return out

    def tokenizer(self):
        tokens = self.field("tokenizer.ggml.tokens")
        if tokens is None:
            raise WeightsError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
        model = self.field("tokenizer.ggml.model")
        if model != "llama":
            raise WeightsError(f"{self.path}: tokenizer model {model!r}; expected 'llama' (SentencePiece BPE)")
        return build_from_sentencepiece_vocab(tokens, self.field("tokenizer.ggml.scores"),
                                              self.field("tokenizer.ggml.token_type"))

    def progress_reader(self, quiet: bool = False):
        """get_tensor that prints a progress line to stderr (dequantizing takes a few seconds)."""
        total = len(self.tensor_names())
        done = [0]

        def get(name: str) -> torch.Tensor:
            done[0] += 1
            if not quiet and (done[0] % 16 == 0 or done[0] == total):
                print(f"\rgemma3_fast: dequantizing {self.path.name}: {done[0]}/{total} tensors", end="",
                      file=sys.stderr, flush=True)
                if done[0] == total:
                    print(file=sys.stderr)
            return self.get_tensor(name)

        return get
