"""Weight-only int8 quantization: one fp32 scale per output row, symmetric, for every linear and the head.

Decode reads every weight once per token, so halving the bytes of bf16 (quartering fp32) raises the
bandwidth ceiling accordingly. Activations, norms, the KV cache and the embedding lookup keep the model dtype.
The loader (weights.build_model) quantizes each weight as it reads it; the `linear` op consumes (q, scales).
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight ~= q * scales[:, None]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales
