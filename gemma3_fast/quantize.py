"""Weight-only int8 quantization: one fp32 scale per output row, symmetric, for every linear and the head.

Decode reads every weight once per token, so halving the bytes of bf16 (quartering fp32) raises the
bandwidth ceiling accordingly. Activations, norms, the KV cache and the embedding lookup keep the model dtype.
"""

from __future__ import annotations

import torch

from .model import Gemma3Model, Linear

QUANT_MODES = ("none", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight ~= q * scales[:, None]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


def _quantize_linear(linear: Linear, weight: torch.Tensor) -> None:
    q, scales = quantize_int8(weight)
    linear.weight = torch.nn.Parameter(q, requires_grad=False)
    linear.scales = scales


@torch.no_grad()
def quantize_model(model: Gemma3Model, mode: str = "int8") -> Gemma3Model:
    """Quantize in place. The output head gets its own int8 copy; the embedding keeps its dtype for lookups."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    if mode == "none":
        return model
    for block in model.layers:
        for linear in (block.qkv_proj, block.o_proj, block.gate_up_proj, block.down_proj):
            _quantize_linear(linear, linear.weight)
    head = Linear(model.config.hidden_size, model.config.vocab_size).to(model.device)
    _quantize_linear(head, model.embed_tokens.weight)
    model.lm_head = head
    return model
