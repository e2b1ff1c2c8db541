"""Pure-PyTorch reference operators: the specification of every C++/CUDA kernel in csrc/.

Shapes (batch 1; T tokens of one sequence):
  x, residual      [T, hidden]              norms
  q                [T, Hq, D]               query heads
  k, v             [T, Hk, D]               key/value heads of the new tokens
  k_cache, v_cache [S, Hk, D]               preallocated cache; position p lives in slot p % S
  positions        int64 [T], consecutive   absolute positions of the T tokens
All math runs in fp32 and is cast back to the input dtype once, at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32."""
    return _norm_f32(x, weight, eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor, pre_weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sandwich-norm step: h = residual + rmsnorm(x, post); y = rmsnorm(h, pre). Returns (h, y).

    The normed branch is rounded to the activation dtype before the add, as transformers does.
    """
    h = (residual.float() + rms_norm(x, post_weight, eps).float()).to(x.dtype)
    return h, rms_norm(h, pre_weight, eps)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE inverse frequencies [head_dim // 2] in fp32, computed as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D/2] (fp32) of the RoPE angles at absolute positions [T]: one table per forward, shared
    by every layer with the same base."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("neox", rotate_half) RoPE on fp32 x [T, H, D]; NOT interleaved pairs."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]), then RoPE with the tables from rope_cos_sin. Returns (q, k)."""
    qn, kn = _norm_f32(q, q_weight, eps), _norm_f32(k, k_weight, eps)
    return apply_rope(qn, cos, sin).to(q.dtype), apply_rope(kn, cos, sin).to(k.dtype)


def _norm_f32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # rms_norm kept in fp32: the fused op rounds once, after RoPE.
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())


def kv_cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor, ring: bool) -> None:
    """Write k/v [T, Hk, D] into slot p % S (ring) or p (linear cache) of the caches [S, Hk, D], in place."""
    size = k_cache.shape[0]
    if not ring and int(positions.max()) >= size:
        raise ValueError(f"kv_cache_write: position {int(positions.max())} is outside the cache of {size} slots")
    if ring and k.shape[0] > size:  # only the last S tokens survive in a ring of S slots
        k, v, positions = k[-size:], v[-size:], positions[-size:]
    slots = positions % size
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              positions: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of T new queries over cached and new keys.

    Query at position i sees key j iff j <= i and (window == 0 or i - j < window). Keys of positions before
    positions[0] come from the cache (slot j % S); keys of the T new tokens come from k/v, so a chunk longer
    than the ring still sees its own keys. The cache is read before this chunk is written into it.
    Returns [T, Hq, D] in q's dtype.
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    size = k_cache.shape[0]
    start = int(positions[0])
    lo = max(0, start - (window - 1)) if window > 0 else 0
    if start - lo > size:
        raise ValueError(f"attention: keys {lo}..{start - 1} are needed but the cache holds only {size} slots")
    cached = torch.arange(lo, start, device=q.device)
    keys = torch.cat((k_cache[cached % size].float(), k.float()))  # [L, Hk, D]
    vals = torch.cat((v_cache[cached % size].float(), v.float()))
    kpos = torch.cat((cached, positions.to(cached.dtype)))
    qpos = positions.to(cached.dtype)

    allowed = kpos[None, :] <= qpos[:, None]
    if window > 0:
        allowed &= (qpos[:, None] - kpos[None, :]) < window
    qg = q.float().view(t, hk, hq // hk, d)  # query heads grouped by the KV head they share
    scores = torch.einsum("tkgd,lkd->kgtl", qg, keys) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("kgtl,lkd->tkgd", probs, vals)
    return out.reshape(t, hq, d).to(q.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T in x's dtype; an int8 weight is dequantized with its per-output-row scales first."""
    if scales is None:
        return F.linear(x, weight.to(x.dtype))
    return F.linear(x, (weight.float() * scales[:, None]).to(x.dtype))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest value along the last dim: the first among equals, NaN above everything."""
    return torch.argmax(x, dim=-1)


def decoder_layer(h: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, weights: list[torch.Tensor],
                  scales: list[torch.Tensor | None], norms: list[torch.Tensor], num_heads: int, window: int,
                  scale: float, eps: float, ring: bool, write_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gemma 3 block. h: residual stream [T, hidden]; y: h after this block's input norm.

    weights = [qkv, o, gate_up, down] (q|k|v and gate|up fused by rows), scales = their int8 per-row scales
    (or None), norms = [q, k, post_attn, pre_ff, post_ff, next]: `next` is the following block's input norm (the
    final norm after the last block), so the returned y is ready for the next block. Returns (h, y).
    """
    w_qkv, w_o, w_gate_up, w_down = weights
    s_qkv, s_o, s_gate_up, s_down = scales
    q_norm, k_norm, post_attn_norm, pre_ff_norm, post_ff_norm, next_norm = norms
    t, d = y.shape[0], q_norm.shape[0]
    qkv = linear(y, w_qkv, s_qkv)
    hk = (qkv.shape[-1] // d - num_heads) // 2
    q, k, v = qkv.split((num_heads * d, hk * d, hk * d), dim=-1)
    q, k = qk_norm_rope(q.view(t, num_heads, d), k.view(t, hk, d), q_norm, k_norm, cos, sin, eps)
    v = v.reshape(t, hk, d)
    attn = attention(q, k, v, k_cache, v_cache, positions, window, scale)
    if write_cache:  # after attention: a chunk longer than the ring still attends to its own keys
        kv_cache_write(k_cache, v_cache, k, v, positions, ring)
    h, y = add_rms_norm(linear(attn.reshape(t, num_heads * d), w_o, s_o), h, post_attn_norm, pre_ff_norm, eps)
    gate, up = linear(y, w_gate_up, s_gate_up).chunk(2, dim=-1)
    mlp = linear(F.gelu(gate, approximate="tanh") * up, w_down, s_down)
    return add_rms_norm(mlp, h, post_ff_norm, next_norm, eps)


def decoder_layers(h: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, rope: list[torch.Tensor],
                   k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], weights: list[torch.Tensor],
                   scales: list[torch.Tensor | None], norms: list[torch.Tensor], windows: list[int], ring: list[bool],
                   num_heads: int, scale: float, eps: float, write_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks in order: decoder_layer on layer i with rope[2i], rope[2i+1] (cos, sin), k_caches[i],
    v_caches[i], weights[4i:4i+4], scales[4i:4i+4], norms[6i:6i+6], windows[i], ring[i]. Returns (h, y)."""
    n = len(windows)
    for name, got, per_layer in (("rope", rope, 2), ("k_caches", k_caches, 1), ("v_caches", v_caches, 1),
                                 ("weights", weights, 4), ("scales", scales, 4), ("norms", norms, 6),
                                 ("ring", ring, 1)):
        if len(got) != per_layer * n:
            raise ValueError(f"decoder_layers takes {per_layer} {name} per layer: {n} layers (the length of "
                             f"windows) need {per_layer * n}, got {len(got)}")
    for i in range(n):
        h, y = decoder_layer(h, y, positions, rope[2 * i], rope[2 * i + 1], k_caches[i], v_caches[i],
                             weights[4 * i:4 * i + 4], scales[4 * i:4 * i + 4], norms[6 * i:6 * i + 6], num_heads,
                             windows[i], scale, eps, ring[i], write_cache)
    return h, y


def decoder_forward(ids: torch.Tensor, positions: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float,
                    first_norm: torch.Tensor, inv_freq_local: torch.Tensor, inv_freq_global: torch.Tensor,
                    k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], weights: list[torch.Tensor],
                    scales: list[torch.Tensor | None], norms: list[torch.Tensor], windows: list[int], ring: list[bool],
                    head_weight: torch.Tensor, head_scales: torch.Tensor | None, num_heads: int, scale: float,
                    eps: float, write_cache: bool, all_logits: bool) -> torch.Tensor:
    """The whole model on token ids [T] at absolute positions [T]: embedding rows times embed_scale (sqrt(hidden)
    rounded to the weight dtype), the first block's input norm, RoPE tables for the local and global bases,
    decoder_layers (sliding layers take the local tables), the output head. Returns logits [T, vocab], or the
    last position's [1, vocab] unless all_logits."""
    h = F.embedding(ids, embed_weight) * embed_scale
    y = rms_norm(h, first_norm, eps)
    local, global_ = rope_cos_sin(positions, inv_freq_local), rope_cos_sin(positions, inv_freq_global)
    rope = [t for window in windows for t in (local if window else global_)]
    h, y = decoder_layers(h, y, positions, rope, k_caches, v_caches, weights, scales, norms, windows, ring,
                          num_heads, scale, eps, write_cache)
    return linear(y if all_logits else y[-1:], head_weight, head_scales)
