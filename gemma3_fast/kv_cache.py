"""Preallocated KV cache: allocated once per generation, written in place, never grown."""

from __future__ import annotations

import torch

from .config import Gemma3Config


class KVCache:
    """Per-layer key/value buffers [slots, kv_heads, head_dim].

    Global layers hold `max_len` slots (position p in slot p); sliding layers hold a ring of
    min(sliding_window, max_len) slots (position p in slot p % window). Keys are stored after k_norm and
    RoPE at their absolute position, so a slot never needs re-rotation. `seq_len` is the number of
    positions written so far: absolute positions are tracked here, never read from a buffer's size.
    """

    def __init__(self, config: Gemma3Config, max_len: int, dtype: torch.dtype, device: torch.device | str):
        if max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"KVCache max_len {max_len} exceeds the model's context of {config.max_position_embeddings} tokens")
        self.max_len = max_len
        self.seq_len = 0
        self.ring: list[bool] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_hidden_layers):
            sliding = config.is_sliding(layer)
            slots = min(config.sliding_window, max_len) if sliding else max_len
            shape = (slots, config.num_key_value_heads, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.ring.append(sliding)

    def check_room(self, n: int) -> None:
        """Raise if n more positions do not fit."""
        if self.seq_len + n > self.max_len:
            raise ValueError(f"{self.seq_len} cached + {n} new tokens exceed the KV cache of {self.max_len}")

    def reset(self) -> None:
        self.seq_len = 0  # stale slots are never read: attention only reads positions < seq_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
