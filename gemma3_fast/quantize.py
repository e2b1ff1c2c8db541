"""Weight-only int8 quantization: one fp32 scale per output row, symmetric, for every linear and the head.

Decode reads every weight once per token, so halving the bytes of bf16 (quartering fp32) raises the
bandwidth ceiling accordingly. Activations, norms and the KV cache keep the model dtype. The embedding is the
tied head: its lookup reads the int8 head's rows times their scales (no second, full-precision table: 335 MB in
bf16 for the 270M model), rounded to the model dtype.
The loader (weights.build_model) quantizes each weight as it reads it; the `linear` op consumes (q, scales).
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8")
QUANT_ELEMENTS = 1 << 18  # per chunk: its fp32 temporaries are 1 MB each


def quant_rows(cols: int) -> int:
    """Rows per chunk of quantize_int8 (and of the loader's quantizing reads) for rows of `cols` elements."""
    return max(1, QUANT_ELEMENTS // max(1, cols))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight ~= q * scales[:, None]. Rows are quantized a chunk of
    QUANT_ELEMENTS at a time: the fp32 temporaries of the whole 262144-row embedding at once took ~2.7 GB at the
    peak of loading, and 4096 rows' (10-40 MB) still showed in an int8 load's peak."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    rows = quant_rows(weight.shape[-1])
    for a in range(0, weight.shape[0], rows):
        w = weight[a:a + rows].to(torch.float32, copy=True)  # a copy even of fp32: divided in place below
        s = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q[a:a + rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scales[a:a + rows] = s
    return q, scales
