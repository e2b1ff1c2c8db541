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
QUANT_ROWS = 1024


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight ~= q * scales[:, None]. Rows are quantized QUANT_ROWS at a
    time: the fp32 temporaries of the whole 262144-row embedding at once took ~2.7 GB at the peak of loading, and
    4096 rows' ~40 MB still showed in an int8 load's peak."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for a in range(0, weight.shape[0], QUANT_ROWS):
        w = weight[a:a + QUANT_ROWS].to(torch.float32, copy=True)  # a copy even of fp32: divided in place below
        s = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q[a:a + QUANT_ROWS] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scales[a:a + QUANT_ROWS] = s
    return q, scales
