"""Read a llama.cpp GGUF file of Gemma 3: config, tensors (HF names, HF conventions), tokenizer.

The file is parsed here (header, metadata, tensor table) and its tensor data memory-mapped: `blocks(name)` hands
out a quantized tensor's blocks in place, zero-copy (gguf_blocks.py, the native path), `get_tensor(name)`
dequantizes it to fp32 (the --dtype path). gguf.GGUFReader was not used for this: it builds a numpy object per
metadata item, which for Gemma's 262144-token vocabulary took ~10 s and ~700 MB before any tensor was read.
"""

from __future__ import annotations

import mmap
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from . import gguf_blocks
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

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_F32, _F16, _BF16 = 0, 1, 30


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise WeightsError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, the file has "
                               f"{len(self.buf)})")
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _NUMPY:  # numbers: one numpy array over the bytes
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            if item == _STRING:  # read when asked for (the vocabulary: 262144 strings, ~30 MB as Python objects)
                start = self.pos
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                if self.pos > len(self.buf):
                    raise WeightsError(f"{self.path}: truncated GGUF header (a string array runs past the end)")
                return _StringArray(self.buf, start, count)
            return [self.value(item) for _ in range(count)]
        raise WeightsError(f"{self.path}: unknown GGUF metadata value type {kind} at byte {self.pos}")


class _StringArray:
    """A GGUF array of strings, decoded on first use: len() without decoding."""

    def __init__(self, buf: mmap.mmap, start: int, count: int):
        self.buf, self.start, self.count = buf, start, count

    def __len__(self) -> int:
        return self.count

    def strings(self) -> list[str]:
        out, pos, buf = [], self.start, self.buf
        for _ in range(self.count):
            n = struct.unpack_from("<Q", buf, pos)[0]
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        return out


class GGUFFile:
    """A Gemma 3 GGUF opened for reading: metadata parsed, tensor data memory-mapped (copy-on-write, never
    written), each tensor checked to lie inside the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        with self.path.open("rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as e:  # an empty file
                raise WeightsError(f"{self.path}: not a GGUF file ({e})") from None
        self.fields, self.tensors = self._parse()
        arch = self.field("general.architecture")
        if arch != "gemma3":
            raise WeightsError(f"{self.path}: architecture is {arch!r}, expected 'gemma3'")
        self._gguf_name = {hf_name(g): g for g in self.tensors if hf_name(g) is not None}
        self._data = torch.frombuffer(self._map, dtype=torch.uint8)  # shares the mapping; keeps it alive

    def _parse(self):
        cur = _Cursor(self._map, self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise WeightsError(f"{self.path}: not a GGUF file (no GGUF magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise WeightsError(f"{self.path}: GGUF version {version}; this reader knows versions 2 and 3")
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(fields.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        tensors = {}
        for name, dims, kind, offset in infos:
            shape = tuple(int(d) for d in reversed(dims))  # GGUF lists dims innermost first
            nbytes = gguf_blocks.tensor_nbytes(kind, shape, f"{self.path}: tensor {name!r}")
            begin = start + offset
            if begin + nbytes > len(self._map):
                raise WeightsError(f"{self.path}: tensor {name!r} ends at byte {begin + nbytes}, past the end of the "
                                   f"file ({len(self._map)} bytes): the file is truncated")
            tensors[name] = (kind, shape, begin, nbytes)
        return fields, tensors

    def field(self, key: str, default=None):
        value = self.fields.get(key, default)
        return value.strings() if isinstance(value, _StringArray) else value

    def config(self) -> Gemma3Config:
        a = "gemma3."
        need = {"embedding_length": None, "block_count": None, "feed_forward_length": None,
                "attention.head_count": None, "attention.head_count_kv": None}
        for k in need:
            need[k] = self.field(a + k)
            if need[k] is None:
                raise WeightsError(f"{self.path}: metadata key {a + k} missing")
        heads = int(need["attention.head_count"])
        head_dim = int(self.field(a + "attention.key_length", need["embedding_length"] // heads))
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise WeightsError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
        return Gemma3Config(
            vocab_size=len(tokens),
            hidden_size=int(need["embedding_length"]),
            intermediate_size=int(need["feed_forward_length"]),
            num_hidden_layers=int(need["block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(need["attention.head_count_kv"]),
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

    def _raw(self, name: str) -> tuple[str, int, tuple[int, ...], torch.Tensor]:
        gname = self._gguf_name[name]
        kind, shape, begin, nbytes = self.tensors[gname]
        return gname, kind, shape, self._data[begin:begin + nbytes]

    def _values(self, gname: str, kind: int, raw: torch.Tensor) -> torch.Tensor:
        """The values of `raw` (a tensor's bytes, or a run of its rows), flat: a view for F32/F16/BF16, else
        dequantized to fp32 by the gguf package."""
        if kind in (_F32, _F16, _BF16):
            return raw.view({_F32: torch.float32, _F16: torch.float16, _BF16: torch.bfloat16}[kind])
        from gguf.quants import dequantize

        try:
            data = dequantize(raw.numpy(), kind)
        except (NotImplementedError, ValueError):
            raise WeightsError(f"{self.path}: tensor {gname!r} has quantization type "
                               f"{gguf_blocks.type_name(kind)}, which the gguf package cannot dequantize") from None
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).view(-1)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its HF name, dequantized to fp32, in HF conventions (norms without Gemma's +1)."""
        gname, kind, shape, raw = self._raw(name)
        out = self._values(gname, kind, raw).reshape(shape).to(torch.float32, copy=True)  # never the mapping
        if name.endswith("norm.weight"):
            out -= 1.0  # llama.cpp stores Gemma norms as (1 + w)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """get_tensor(name) written into `out` (its shape, any float dtype) in chunks of rows of ~16 MB of fp32: the
        271M-value embedding never exists in fp32 when the model is bf16 (671 MB)."""
        gname, kind, shape, raw = self._raw(name)
        if tuple(out.shape) != shape or len(shape) != 2:
            raise ValueError(f"read_into: {gname!r} has shape {shape}, out has {tuple(out.shape)}")
        row_bytes = raw.numel() // shape[0]
        step = max(1, (16 << 20) // (4 * shape[1]))
        for a in range(0, shape[0], step):
            b = min(shape[0], a + step)
            out[a:b].copy_(self._values(gname, kind, raw[a * row_bytes:b * row_bytes]).reshape(b - a, shape[1]))
        if name.endswith("norm.weight"):
            out -= 1.0
        return out

    def native_tensor(self, name: str) -> torch.Tensor:
        """One tensor for the native path: quantized ones as their blocks in place (uint8 [rows, blocks,
        block_bytes], a view of the file's mapping); BF16 projections as bf16 (the bf16 kernels, fp32
        activations); the rest (F32, F16, a BF16 embedding, whose dtype would set the activations') in fp32."""
        gname, kind, shape, raw = self._raw(name)
        if kind == _BF16 and len(shape) == 2 and gname != "token_embd.weight":
            return raw.view(torch.bfloat16).reshape(shape)
        if kind in (_F32, _F16, _BF16):
            return self.get_tensor(name)
        if not gguf_blocks.is_native_type(kind):
            raise WeightsError(
                f"{self.path}: tensor {gname!r} has type {gguf_blocks.type_name(kind)}, which has no native kernel "
                f"(native: {', '.join(gguf_blocks.NATIVE_TYPE_NAMES)}); load it dequantized with --dtype float32 "
                "(or bfloat16, or --quantize int8)")
        return gguf_blocks.as_blocks(raw, kind, shape, f"{self.path}: tensor {gname!r}")

    def tensor_type(self, name: str) -> str:
        return gguf_blocks.type_name(self.tensors[self._gguf_name[name]][0])

    def release_pages(self) -> None:
        """Drop this process's mapping of pages read so far (MADV_DONTNEED; the page cache keeps them): tensors
        copied out during loading stop counting in the RSS, and those used in place fault back in on first use."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop this process's pages of the file under `tensor` (a view of the mapping, already copied)."""
        base, ptr = self._data.data_ptr(), tensor.data_ptr()
        nbytes = tensor.numel() * tensor.element_size()
        if not hasattr(mmap, "MADV_DONTNEED") or not base <= ptr < base + len(self._map):
            return
        start = (ptr - base) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, min(len(self._map), ptr - base + nbytes) - start)

    def tokenizer(self):
        tokens = self.field("tokenizer.ggml.tokens")
        if tokens is None:
            raise WeightsError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
        model = self.field("tokenizer.ggml.model")
        if model != "llama":
            raise WeightsError(f"{self.path}: tokenizer model {model!r}; expected 'llama' (SentencePiece BPE)")
        scores, types = self.field("tokenizer.ggml.scores"), self.field("tokenizer.ggml.token_type")
        return build_from_sentencepiece_vocab(tokens, [float(s) for s in scores], [int(t) for t in types])

    def progress_reader(self, quiet: bool = False, native: bool = False):
        """get_tensor (or native_tensor) that prints a progress line to stderr."""
        total = len(self.tensor_names())
        done = [0]
        read = self.native_tensor if native else self.get_tensor

        def get(name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
            """dtype: converted by the caller; out: where to write a dequantized tensor (see read_into)."""
            done[0] += 1
            if not quiet and not native and (done[0] % 16 == 0 or done[0] == total):
                print(f"\rgemma3_fast: dequantizing {self.path.name}: {done[0]}/{total} tensors", end="",
                      file=sys.stderr, flush=True)
                if done[0] == total:
                    print(file=sys.stderr)
            t = self.read_into(name, out) if out is not None and not native else read(name)
            if not native:  # dequantized: the file's pages of this tensor are done with
                self.release(self._raw(name)[3])
            return t

        get.release = self.release  # build_model calls it for tensors it copies out of the mapping
        get.native = native
        get.reads_into = not native
        return get
