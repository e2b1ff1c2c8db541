"""Weight-only int8 quantization: one fp32 scale per output row, symmetric, for every linear and the head.

Decode reads every weight once per token, so halving the bytes of bf16 (quartering fp32) raises the
bandwidth ceiling accordingly. Activations, norms, the KV cache and the embedding lookup keep the model dtype.
The loader (weights.build_model) quantizes each weight as it reads it; the `linear` op consumes (q, scales).
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight ~= q * scales[:, None]. Rows are quantized in chunks of 4096:
    the fp32 temporaries of the whole 262144-row embedding at once took ~2.7 GB at the peak of loading."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for a in range(0, weight.shape[0], 4096):
        w = weight[a:a + 4096].float()
        s = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q[a:a + 4096] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scales[a:a + 4096] = s
    return q, scales
