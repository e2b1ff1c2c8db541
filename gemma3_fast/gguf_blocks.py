"""GGUF block formats as weights: uint8 tensors [rows, blocks, block_bytes] that the linear op computes with
directly (csrc/cpu/gguf_blocks.h). block_bytes tells the formats apart, so such a tensor describes itself.

The dequantization this module offers (`dequantize`, the reference op's) is gguf.quants.dequantize, the
specification the C++ decoding is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml type id -> (name, weights per block, bytes per block): the formats with native kernels.
NATIVE = {2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
          13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
NATIVE_TYPE_NAMES = [v[0] for v in NATIVE.values()]
_BY_BYTES = {block_bytes: (kind, elems) for kind, (_, elems, block_bytes) in NATIVE.items()}
Q8_0 = 8


def _quant_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # every ggml type: (weights per block, bytes per block)

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def type_name(kind: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"unknown type {kind}"


def is_native_type(kind: int) -> bool:
    return kind in NATIVE


def tensor_nbytes(kind: int, shape: tuple[int, ...], what: str) -> int:
    from .weights import WeightsError

    sizes = _quant_sizes()
    if kind not in sizes:
        raise WeightsError(f"{what} has ggml type {kind}, which the gguf package does not know")
    elems, block_bytes = sizes[kind]
    if shape[-1] % elems:
        raise WeightsError(f"{what} ({type_name(kind)}) has rows of {shape[-1]} values, not a multiple of its "
                           f"block of {elems}")
    return int(np.prod(shape, dtype=np.int64)) // elems * block_bytes


def as_blocks(raw: torch.Tensor, kind: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The bytes of a quantized GGUF tensor of `shape` ([rows, in_features]) as [rows, blocks, block_bytes]."""
    from .weights import WeightsError

    name, elems, block_bytes = NATIVE[kind]
    if len(shape) != 2 or shape[1] % elems:
        raise WeightsError(f"{what} ({name}) has shape {shape}; a block weight needs [rows, in_features] with "
                           f"in_features a multiple of {elems}")
    return raw.view(shape[0], shape[1] // elems, block_bytes)


def is_blocks(t: torch.Tensor) -> bool:
    return t.dtype == torch.uint8 and t.dim() == 3


def block_type(t: torch.Tensor) -> int:
    if not is_blocks(t) or t.shape[2] not in _BY_BYTES:
        raise ValueError(f"not a GGUF block weight (uint8 [rows, blocks, block_bytes] with block_bytes one of "
                         f"{sorted(_BY_BYTES)}): got {t.dtype} of shape {tuple(t.shape)}")
    return _BY_BYTES[t.shape[2]][0]


def in_features(t: torch.Tensor) -> int:
    return t.shape[1] * NATIVE[block_type(t)][1] if is_blocks(t) else t.shape[-1]


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, in_features] of a block weight, as gguf.quants.dequantize computes it."""
    from gguf.quants import dequantize as gguf_dequantize

    kind = block_type(blocks)
    data = blocks.detach().cpu().contiguous().numpy().reshape(blocks.shape[0], -1)
    out = gguf_dequantize(data, kind).reshape(blocks.shape[0], -1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(blocks.device)


def _as_q8_0(t: torch.Tensor) -> torch.Tensor | None:
    """Q4_0 / Q5_0 / Q8_0 blocks as Q8_0 ones, exactly: the same fp16 scale d and the same integers (q - 8,
    q - 16 fit int8), so every weight d * q is unchanged. None for the other formats."""
    kind = block_type(t)
    if kind == Q8_0:
        return t
    if kind not in (2, 6):
        return None
    d, rest = t[..., :2], t[..., 2:]
    if kind == 2:
        low, high = rest & 0x0F, rest >> 4
        q = torch.cat([low, high], -1).to(torch.int16) - 8
    else:
        qh = rest[..., :4].to(torch.int64)
        bits = (qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24)[..., None]
        fifth = (bits >> torch.arange(32)) & 1
        qs = rest[..., 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], -1).to(torch.int64) | (fifth << 4)
        q = q.to(torch.int16) - 16
    return torch.cat([d, q.to(torch.int8).view(torch.uint8)], -1)


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of block weights (q|k|v, gate|up). Parts of different formats are brought to one
    format where that is exact (Q4_0/Q5_0 -> Q8_0: the default file's v projection is Q8_0 in half the layers,
    q and k Q5_0); otherwise the result is fp32, dequantized (exact, larger)."""
    kinds = {block_type(p) for p in parts}
    if len(kinds) == 1:
        return torch.cat(parts)
    as_q8 = [_as_q8_0(p) for p in parts]
    if all(p is not None for p in as_q8):
        return torch.cat(as_q8)
    return torch.cat([dequantize(p) for p in parts])
