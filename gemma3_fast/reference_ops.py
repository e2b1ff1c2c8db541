"""Pure-PyTorch reference operators: the specification of every C++/CUDA kernel in csrc/.

Shapes (batch 1; T tokens of one sequence):
  x, residual      [T, hidden]              norms
  q                [T, Hq, D]               query heads
  k, v             [T, Hk, D]               key/value heads of the new tokens
  k_cache, v_cache [S, Hk, D]               preallocated cache; position p lives in slot p % S
  positions        int64 [T], consecutive   absolute positions of the T tokens
All math runs in fp32 (float64 inputs stay float64, for gradcheck) and is cast back to the input dtype once, at
the end. Training runs the same composition (decoder_block) batched: [B, T, ...] with causal_attention.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import gguf_blocks

_THIS = sys.modules[__name__]  # this module as decoder_block's op set


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32."""
    return _norm_f32(x, weight, eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor, pre_weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sandwich-norm step: h = residual + rmsnorm(x, post); y = rmsnorm(h, pre). Returns (h, y).

    The normed branch is rounded to the activation dtype before the add, as transformers does.
    """
    h = (_acc(residual) + _acc(rms_norm(x, post_weight, eps))).to(x.dtype)
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


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype: fp32, or float64 for float64 inputs (gradcheck runs the reference in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _norm_f32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # rms_norm kept in fp32: the fused op rounds once, after RoPE.
    xf = _acc(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + _acc(w))


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
    size = k_cache.shape[0]
    start = int(positions[0])
    lo = max(0, start - (window - 1)) if window > 0 else 0
    if start - lo > size:
        raise ValueError(f"attention: keys {lo}..{start - 1} are needed but the cache holds only {size} slots")
    cached = torch.arange(lo, start, device=q.device)
    keys = torch.cat((_acc(k_cache[cached % size]), _acc(k)))  # [L, Hk, D]
    vals = torch.cat((_acc(v_cache[cached % size]), _acc(v)))
    kpos = torch.cat((cached, positions.to(cached.dtype)))
    return _softmax_attention(q, keys, vals, positions.to(cached.dtype), kpos, window, scale, with_lse=False)[0]


def _softmax_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, qpos: torch.Tensor,
                       kpos: torch.Tensor, window: int, scale: float,
                       with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D] at positions qpos over keys/vals [L, Hk, D] at kpos: (out [T, Hq, D] in q's dtype, the
    log-sum-exp of each query's visible scores [T, Hq] in the accumulation dtype, or None without with_lse)."""
    t, hq, d = q.shape
    hk = keys.shape[1]
    allowed = kpos[None, :] <= qpos[:, None]
    if window > 0:
        allowed &= (qpos[:, None] - kpos[None, :]) < window
    qg = _acc(q).view(t, hk, hq // hk, d)  # query heads grouped by the KV head they share
    scores = torch.einsum("tkgd,lkd->kgtl", qg, keys) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("kgtl,lkd->tkgd", probs, vals).reshape(t, hq, d).to(q.dtype)
    return out, torch.logsumexp(scores, dim=-1).reshape(hq, t).t() if with_lse else None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training attention: q [B, T, Hq, D], k/v [B, T, Hk, D], each batch row a sequence from position 0 and no
    cache (the same visibility as attention()). Returns (out [B, T, Hq, D], lse [B, T, Hq] fp32)."""
    pos = torch.arange(q.shape[1], device=q.device)
    outs, lses = zip(*(_softmax_attention(q[b], _acc(k[b]), _acc(v[b]), pos, pos, window, scale)
                       for b in range(q.shape[0])))
    lse = torch.stack(lses)
    return torch.stack(outs), lse if lse.dtype == torch.float64 else lse.float()


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation on the fused gate|up projection [..., 2I]: gelu_tanh(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF block weight uint8 [rows, blocks, block_bytes] -> fp32 [rows, in_features]: gguf.quants.dequantize."""
    return gguf_blocks.dequantize(blocks)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T in x's dtype; an int8 weight is dequantized with its per-output-row scales first, GGUF blocks
    by `dequantize` (fp32 activations)."""
    if gguf_blocks.is_blocks(weight):
        return F.linear(x.float(), dequantize(weight)).to(x.dtype)
    if scales is None:
        return F.linear(x, weight.to(x.dtype))
    return F.linear(x, (weight.float() * scales[:, None]).to(x.dtype))


def softmax_cross_entropy_(logits_t: torch.Tensor, targets: torch.Tensor, grad_scale: float,
                           ignore_index: int) -> torch.Tensor:
    """The loss of fp32 logits given transposed, logits_t [V, N] (column n: token n), against targets [N], in
    place: each column becomes its gradient (softmax - one_hot(target)) * grad_scale, zero where the target is
    ignore_index. Returns the per-token losses logsumexp - logit[target] [N] (0 for ignored tokens)."""
    logits = logits_t.t()
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    losses = torch.where(keep, lse - logits.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.softmax(logits, dim=-1)
    grad[torch.arange(len(targets), device=logits.device), safe] -= 1.0
    logits.copy_(grad * grad_scale * keep[:, None])
    return losses


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest value along the last dim: the first among equals, NaN above everything."""
    return torch.argmax(x, dim=-1)


def decoder_block(ops, h: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                  weights: list[torch.Tensor], scales: list[torch.Tensor | None], norms: list[torch.Tensor],
                  num_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gemma 3 block, the composition every path runs: inference (decoder_layer below, over a KV cache) and
    training (batched, model.Gemma3Model.hidden_states). h: residual stream [..., T, hidden]; y: h after this
    block's input norm. `ops` provides linear, qk_norm_rope, add_rms_norm and gelu_tanh_mul (this module, or
    the extension's autograd-capable ops); attend(q, k, v) -> [..., T, Hq, D] is the attention over whatever
    keys the caller has (cache or batch).

    weights = [qkv, o, gate_up, down] (q|k|v and gate|up fused by rows), scales = their int8 per-row scales
    (or None), norms = [q, k, post_attn, pre_ff, post_ff, next]: `next` is the following block's input norm (the
    final norm after the last block), so the returned y is ready for the next block. Returns (h, y).
    """
    w_qkv, w_o, w_gate_up, w_down = weights
    s_qkv, s_o, s_gate_up, s_down = scales
    q_norm, k_norm, post_attn_norm, pre_ff_norm, post_ff_norm, next_norm = norms
    d = q_norm.shape[0]
    qkv = ops.linear(y, w_qkv, s_qkv)
    hk = (qkv.shape[-1] // d - num_heads) // 2
    q, k, v = qkv.split((num_heads * d, hk * d, hk * d), dim=-1)
    q, k = ops.qk_norm_rope(q.unflatten(-1, (num_heads, d)), k.unflatten(-1, (hk, d)), q_norm, k_norm, cos, sin, eps)
    attn = attend(q, k, v.unflatten(-1, (hk, d)))
    h, y = ops.add_rms_norm(ops.linear(attn.flatten(-2), w_o, s_o), h, post_attn_norm, pre_ff_norm, eps)
    mlp = ops.linear(ops.gelu_tanh_mul(ops.linear(y, w_gate_up, s_gate_up)), w_down, s_down)
    return ops.add_rms_norm(mlp, h, post_ff_norm, next_norm, eps)


def decoder_layer(h: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, weights: list[torch.Tensor],
                  scales: list[torch.Tensor | None], norms: list[torch.Tensor], num_heads: int, window: int,
                  scale: float, eps: float, ring: bool, write_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """decoder_block on one sequence (h, y [T, hidden]) at `positions`, attending over the KV cache."""

    def attend(q, k, v):
        out = attention(q, k, v, k_cache, v_cache, positions, window, scale)
        if write_cache:  # after attention: a chunk longer than the ring still attends to its own keys
            kv_cache_write(k_cache, v_cache, k, v, positions, ring)
        return out

    return decoder_block(_THIS, h, y, cos, sin, attend, weights, scales, norms, num_heads, eps)


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
    last position's [1, vocab] unless all_logits. An int8 embed_weight is the tied int8 head: its rows times
    head_scales (fp32), rounded once to first_norm's dtype, the activations'."""
    if gguf_blocks.is_blocks(embed_weight):  # only the rows looked up are dequantized
        h = dequantize(embed_weight[ids]) * embed_scale
    elif embed_weight.dtype == torch.int8:
        if head_scales is None:
            raise ValueError("an int8 embed_weight is the tied int8 head and is looked up with head_scales, "
                             "but head_scales is None")
        h = (embed_weight[ids].float() * head_scales[ids, None] * embed_scale).to(first_norm.dtype)
    else:
        h = F.embedding(ids, embed_weight) * embed_scale
    y = rms_norm(h, first_norm, eps)
    local, global_ = rope_cos_sin(positions, inv_freq_local), rope_cos_sin(positions, inv_freq_global)
    rope = [t for window in windows for t in (local if window else global_)]
    h, y = decoder_layers(h, y, positions, rope, k_caches, v_caches, weights, scales, norms, windows, ring,
                          num_heads, scale, eps, write_cache)
    return linear(y if all_logits else y[-1:], head_weight, head_scales)


def decoder_forward_batched(ids: torch.Tensor, positions: torch.Tensor, embed_weight: torch.Tensor,
                            embed_scale: float, first_norm: torch.Tensor, inv_freq_local: torch.Tensor,
                            inv_freq_global: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                            weights: list[torch.Tensor], scales: list[torch.Tensor | None], norms: list[torch.Tensor],
                            windows: list[int], ring: list[bool], head_weight: torch.Tensor,
                            head_scales: torch.Tensor | None, num_heads: int, scale: float, eps: float) -> torch.Tensor:
    """One decode step of B sequences: ids[b] at positions[b], sequence b over its own caches (its layer i at
    k_caches[b * layers + i]), each key and value written there. Logits [B, vocab]: row b is decoder_forward of
    sequence b alone, which is what this does."""
    n, b = len(windows), ids.shape[0]
    if len(k_caches) != b * n or len(v_caches) != b * n:
        raise ValueError(f"decoder_forward_batched takes one k_cache and one v_cache per sequence and layer: {b} "
                         f"sequences x {n} layers need {b * n}, got {len(k_caches)} and {len(v_caches)}")
    rows = [decoder_forward(ids[i:i + 1], positions[i:i + 1], embed_weight, embed_scale, first_norm, inv_freq_local,
                            inv_freq_global, k_caches[i * n:(i + 1) * n], v_caches[i * n:(i + 1) * n], weights,
                            scales, norms, windows, ring, head_weight, head_scales, num_heads, scale, eps, True, False)
            for i in range(b)]
    return torch.cat(rows)
