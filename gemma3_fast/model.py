"""Gemma 3 text model (batch 1), written against the fused ops of gemma3_fast.ops.

Per block: y = norm(h); attention(y) with QK-norm + RoPE over the preallocated KV cache; sandwich norms
fused with the residual adds (h = h + norm(out); y = norm(h)); gated gelu-tanh MLP. Weights are stored
fused where that saves matmul calls: q|k|v in one projection, gate|up in another. The forward is one op,
decoder_forward: embedding, the blocks, the head (reference_ops.decoder_forward spells it out).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops as ops_module
from .config import Gemma3Config
from .kv_cache import KVCache
from .loss import IGNORE_INDEX, TiedWeightGrad, chunked_cross_entropy, tied_embedding
from .reference_ops import decoder_block, rope_cos_sin, rope_inv_freq


class Linear(nn.Module):
    """y = x @ W^T through the op set; W is fp32/bf16, int8 with per-row fp32 `scales` (see quantize.py), or GGUF
    blocks (uint8 [out, blocks, block_bytes], gguf_blocks.py)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("scales", None)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return ops.linear(x, self.weight, self.scales)


class Gemma3Block(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        c = config
        self.hq, self.hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.scale = c.attn_scale
        self.window = c.sliding_window if c.is_sliding(layer) else 0  # 0 = global attention
        self.qkv_proj = Linear(c.hidden_size, (self.hq + 2 * self.hk) * self.d)
        self.o_proj = Linear(self.hq * self.d, c.hidden_size)
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)
        for name in ("input_norm", "post_attn_norm", "pre_ff_norm", "post_ff_norm"):
            setattr(self, name, nn.Parameter(torch.zeros(c.hidden_size)))
        self.q_norm = nn.Parameter(torch.zeros(c.head_dim))
        self.k_norm = nn.Parameter(torch.zeros(c.head_dim))

    def forward(self, h, y, positions, rope, k_cache, v_cache, ring: bool, write_cache: bool, next_norm, ops):
        """h: residual stream [T, hidden]; y: this block's input-normed h; rope: (cos, sin) for this layer's
        base. Returns (h, next block's y). The whole block is one op (see reference_ops.decoder_layer).
        Gemma3Model runs its blocks through a _BlockPlan instead, with the same arguments."""
        return ops.decoder_layer(h, y, positions, *rope, k_cache, v_cache, *self.op_args(next_norm), self.hq,
                                 self.window, self.scale, self.eps, ring, write_cache)

    def op_args(self, next_norm) -> tuple[list, list, list]:
        """decoder_layer's weight, scale and norm lists: [qkv, o, gate_up, down], their int8 scales (or None),
        [q, k, post_attn, pre_ff, post_ff, next]. `next_norm` is the following block's input norm."""
        projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        norms = [self.q_norm, self.k_norm, self.post_attn_norm, self.pre_ff_norm, self.post_ff_norm, next_norm]
        return [m.weight for m in projections], [m.scales for m in projections], norms


class _BlockPlan:
    """Every block's arguments of the decoder_layers op, gathered once and reused while the model's modules,
    parameters and buffers are the same objects. Gathering them per step through nn.Module (attribute lookups,
    __call__ per block) cost ~0.5 ms of a 14-20 ms bf16 decode step. `valid` re-reads every object through the
    dicts the modules keep them in and compares identities (~20 us), so a swapped weight (quantize,
    load_state_dict(assign=True), a replaced submodule or norm, a changed window) rebuilds the plan instead of
    running stale tensors."""

    def __init__(self, model: "Gemma3Model"):
        layers = list(model.layers)
        self.guards: list[tuple[dict, str, object]] = [(model._modules, "layers", model.layers),
                                                       (model._parameters, "final_norm", model.final_norm)]
        self.guards += [(model.layers._modules, name, block) for name, block in model.layers._modules.items()]
        self.weights, self.scales, self.norms = [], [], []
        self.windows = [block.window for block in layers]
        for i, block in enumerate(layers):
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else model.final_norm
            weights, scales, norms = block.op_args(next_norm)
            self.weights += weights
            self.scales += scales
            self.norms += norms
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                proj = block._modules[name]
                self.guards += [(block._modules, name, proj), (proj._parameters, "weight", proj.weight),
                                (proj._buffers, "scales", proj.scales)]
            self.guards += [(block._parameters, name, block._parameters[name]) for name in block._parameters]
            self.guards.append((block.__dict__, "window", block.window))
        self.first_norm = layers[0].input_norm

    def valid(self) -> bool:
        for owner, name, obj in self.guards:
            if owner.get(name) is not obj:
                return False
        return True


class Gemma3Model(nn.Module):
    def __init__(self, config: Gemma3Config, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        # Given its weight, nn.Embedding skips its random init: on the meta device (every load) that init took
        # 1.3 s of start-up, the first use of torch's meta normal_. train.init_weights initializes new models.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.zeros(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Gemma3Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.Parameter(torch.zeros(config.hidden_size))
        # Explicitly on the CPU: models are built under the meta device, and buffers are not loaded weights.
        self.register_buffer("inv_freq_local", rope_inv_freq(config.head_dim, config.rope_theta_local, "cpu"),
                             persistent=False)
        self.register_buffer("inv_freq_global", rope_inv_freq(config.head_dim, config.rope_theta_global, "cpu"),
                             persistent=False)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()
        self._embed_scale: tuple[torch.dtype, float] | None = None
        self.ops = ops_module.resolve_backend(backend, "cpu")

    def tie_weights(self) -> None:
        if self.lm_head.scales is None:
            self.lm_head.weight = self.embed_tokens.weight
        else:  # int8: the lookup reads the quantized head's rows (times its scales), no second, bf16 table
            self.embed_tokens.weight = self.lm_head.weight

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        self.ops = ops_module.resolve_backend(backend, self.device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype: the weights', the norms' for an int8 model (its embedding is the
        int8 head), or fp32 for GGUF block weights."""
        dtype = self.embed_tokens.weight.dtype
        if dtype == torch.int8:
            return self.final_norm.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @property
    def gguf_blocks(self) -> bool:
        """Whether the model runs on GGUF block weights (the native GGUF path: inference only)."""
        return any(p.dtype == torch.uint8 for p in self.parameters())

    def embed_scale(self) -> float:
        """sqrt(hidden) rounded to the weight dtype, as transformers rounds it (bf16: 25.25, fp32: 25.298).
        The rounded value is exact in that dtype, so multiplying by the Python float gives the same result."""
        if self._embed_scale is None or self._embed_scale[0] != self.dtype:
            rounded = float(torch.tensor(self.config.embed_scale, dtype=self.dtype))
            self._embed_scale = (self.dtype, rounded)
        return self._embed_scale[1]

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config, max_len, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Logits for input_ids [T] at absolute positions [T]: [T, vocab] or, by default, [1, vocab] (last).

        With a cache, keys of earlier positions are read from it and the new ones written to it (the caller
        advances cache.seq_len). Without one, this is a plain causal forward from position 0.
        """
        c = self.config
        plan = self._block_plan()
        if cache is None:  # no cache to read or write: empty ones, never written (write_cache=False)
            empty = torch.zeros(0, c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.device)
            layers = len(plan.windows)
            k_caches, v_caches, ring = [empty] * layers, [empty] * layers, [False] * layers
        else:
            k_caches, v_caches, ring = cache.k, cache.v, cache.ring
        # One op: embedding, first norm, RoPE tables, all blocks, output head (reference_ops.decoder_forward).
        return self.ops.decoder_forward(
            input_ids, positions, self.embed_tokens.weight, self.embed_scale(), plan.first_norm, self.inv_freq_local,
            self.inv_freq_global, k_caches, v_caches, plan.weights, plan.scales, plan.norms, plan.windows, ring,
            self.lm_head.weight, self.lm_head.scales, c.num_attention_heads, c.attn_scale, c.rms_norm_eps,
            cache is not None, all_logits)

    # -- training ------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, ops=None, compute_dtype: torch.dtype | None = None,
                      tied: TiedWeightGrad | None = None, seq_lens: list[int] | None = None) -> torch.Tensor:
        """The training forward: ids [B, T], every row a sequence from position 0, no cache. Returns the last
        block's output with the final norm applied, [B, T, hidden], differentiable. The blocks are
        reference_ops.decoder_block, the composition decoder_forward runs, here with `ops` (default:
        ops.training_ops for this model's backend: the extension's ops with their C++ backward) and causal
        attention over the batch. compute_dtype=bfloat16 runs the activations in bf16 from fp32 weights (each
        weight cast per use; its gradient lands in fp32).

        seq_lens (packed sequences, batch 1): the row is several sequences end to end, of these lengths; each
        has its own positions from 0 and attends only to itself, so its outputs are the ones it gets alone."""
        if input_ids.dim() != 2:
            raise ValueError(f"hidden_states takes token ids [batch, tokens], got shape {tuple(input_ids.shape)}")
        if self.lm_head.scales is not None:
            raise ValueError("an int8-quantized model cannot be trained: load it without --quantize")
        if self.gguf_blocks:
            raise ValueError("a model on GGUF block weights cannot be trained: load the GGUF dequantized, with "
                             "dtype float32 (--dtype float32)")
        c = self.config
        if seq_lens is not None:
            if input_ids.shape[0] != 1 or sum(seq_lens) != input_ids.shape[1] or min(seq_lens, default=0) < 1:
                raise ValueError(f"seq_lens {list(seq_lens)[:8]}... must be positive lengths summing to the tokens of "
                                 f"a single row, got input_ids {tuple(input_ids.shape)}")
        longest = max(seq_lens) if seq_lens is not None else input_ids.shape[1]
        if longest > c.max_position_embeddings:
            raise ValueError(f"sequence of {longest} tokens exceeds the model's context of "
                             f"{c.max_position_embeddings}")
        ops = ops or ops_module.training_ops(self.backend, self.device)
        dtype = compute_dtype or self.dtype
        if seq_lens is None:
            positions = torch.arange(input_ids.shape[1], device=self.device)
        else:
            positions = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        tables = {theta: rope_cos_sin(positions, inv) for theta, inv in
                  (("local", self.inv_freq_local), ("global", self.inv_freq_global))}
        h = tied_embedding(input_ids, self.embed_tokens.weight, tied or TiedWeightGrad())
        h = (h * self.embed_scale()).to(dtype)
        layers = list(self.layers)
        y = ops.rms_norm(h, layers[0].input_norm, c.rms_norm_eps)
        for i, block in enumerate(layers):
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.final_norm
            cos, sin = tables["local" if block.window else "global"]

            def attend(q, k, v, window=block.window, scale=block.scale):
                if seq_lens is None:
                    return ops.causal_attention(q, k, v, window, scale)
                return torch.cat([ops.causal_attention(qs, ks, vs, window, scale) for qs, ks, vs in
                                  zip(q.split(seq_lens, 1), k.split(seq_lens, 1), v.split(seq_lens, 1))], 1)

            h, y = decoder_block(ops, h, y, cos, sin, attend, *block.op_args(next_norm), block.hq, block.eps)
        return y

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ops=None,
             compute_dtype: torch.dtype | None = None, seq_lens: list[int] | None = None,
             normalizer: float | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of ids [B, T] against targets [B, T] (IGNORE_INDEX = not counted): the
        training forward, then the output head and the loss in chunks of rows (loss.py), never the whole logits.
        Only the counted rows go through the head (fine-tuning counts only the assistant's tokens). seq_lens:
        packed sequences (see hidden_states). normalizer: divide the summed loss by this instead of the number
        of counted tokens (a step's micro-batches and ranks then weigh every token the same)."""
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        ops = ops or ops_module.training_ops(self.backend, self.device)
        tied = TiedWeightGrad() if self.lm_head.weight is self.embed_tokens.weight else None
        y = self.hidden_states(input_ids, ops, compute_dtype, tied, seq_lens).flatten(0, 1)
        targets = targets.flatten().to(y.device)
        counted = targets != IGNORE_INDEX
        if not bool(counted.all()):
            y, targets = y[counted], targets[counted]
        return chunked_cross_entropy(y, self.lm_head.weight, targets, ops, IGNORE_INDEX, tied, normalizer)

    def _block_plan(self) -> _BlockPlan:
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.valid():
            plan = self.__dict__["_plan"] = _BlockPlan(self)
        return plan

    # -- cache bookkeeping ---------------------------------------------------------------------
    def _positions(self, cache: KVCache, n: int) -> torch.Tensor:
        cache.check_room(n)
        return torch.arange(cache.seq_len, cache.seq_len + n, device=self.device)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache: KVCache, chunk_size: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Run the prompt through the model in chunks of `chunk_size` tokens (0 = one shot)."""
        n = int(input_ids.shape[0])
        if n == 0:
            raise ValueError("prefill needs at least one token")
        step = chunk_size if chunk_size > 0 else n
        outs = []
        for s in range(0, n, step):
            ids = input_ids[s:s + step]
            outs.append(self(ids, self._positions(cache, ids.shape[0]), cache, all_logits=all_logits))
            cache.seq_len += ids.shape[0]
        return torch.cat(outs) if all_logits else outs[-1]

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token [1] in, last-position logits [1, vocab] out."""
        logits = self(token, self._positions(cache, 1), cache)
        cache.seq_len += 1
        return logits

    def decode_session(self, cache: KVCache) -> "DecodeSession":
        """Decode steps over `cache` with the model's current weights bound once: what generation runs."""
        return DecodeSession(self, cache)

    def batched_session(self, caches: list[KVCache]) -> "BatchedDecodeSession":
        """Decode steps of several sequences at once, sequence `slot` over caches[slot]: what the server runs."""
        return BatchedDecodeSession(self, caches)


class DecodeSession:
    """Decode steps of one model over one KV cache: `greedy(token)` returns the next token id, `logits(token)`
    the logits [1, vocab]. Each step is model.decode of that token: the position is cache.seq_len, which it
    advances, so steps mix freely with prefill and decode on the same cache.

    On the CPU extension, the steps run from C++ (gemma3_fast._C.DecodeSession) with decoder_forward's arguments
    gathered once, here: model.decode per step spends ~0.6 ms outside the kernels on a 2-core EPYC (argument
    lists, the weight identity checks, a positions tensor, the argmax call), 4-5% of a bf16 step. The weights
    are the ones the model holds when the session is made: after replacing a weight (quantize, load_state_dict),
    make a new session. Other backends and devices step through model.decode and the backend's argmax.
    """

    def __init__(self, model: Gemma3Model, cache: KVCache):
        self.model, self.cache = model, cache
        self._vocab = model.config.vocab_size
        self._native = None
        if model.ops.name == "extension" and model.device.type == "cpu":
            c, plan = model.config, model._block_plan()
            head = model.lm_head
            self._native = ops_module.native_module().DecodeSession(
                model.embed_tokens.weight, model.embed_scale(), plan.first_norm, model.inv_freq_local,
                model.inv_freq_global, cache.k, cache.v, plan.weights, plan.scales, plan.norms, plan.windows,
                cache.ring, head.weight, head.scales, c.num_attention_heads, c.attn_scale, c.rms_norm_eps)

    def _position(self, token: int) -> int:
        if not 0 <= token < self._vocab:
            raise ValueError(f"token {token} is not a token id: the vocabulary has {self._vocab} entries")
        self.cache.check_room(1)
        return self.cache.seq_len

    def logits(self, token: int) -> torch.Tensor:
        position = self._position(token)
        if self._native is None:
            return self.model.decode(torch.tensor([token], device=self.model.device), self.cache)
        out = self._native.logits(token, position)
        self.cache.seq_len += 1
        return out

    def greedy(self, token: int) -> int:
        if self._native is None:
            return int(self.model.ops.argmax(self.logits(token)))
        nxt = self._native.greedy(token, self._position(token))
        self.cache.seq_len += 1
        return nxt


class BatchedDecodeSession:
    """Decode steps of up to len(caches) sequences together, each over its own KV cache (a slot): `logits(tokens,
    slots)` runs tokens[b] in slot slots[b] at that cache's seq_len, advances it, and returns logits [B, vocab].
    Each weight is read once for the whole batch, and row b equals the logits of a batch-1 step of that sequence
    (decoder_forward_batched's contract): a sequence's output does not depend on what else is in the batch.
    Prefill a slot with model.prefill(ids, caches[slot]). On the CPU extension the steps run from C++ (one
    _C.DecodeSession holding every slot's caches); other backends run the reference op, sequence by sequence."""

    def __init__(self, model: Gemma3Model, caches: list[KVCache]):
        if not caches:
            raise ValueError("a batched session needs at least one KV cache (slot)")
        self.model, self.caches = model, list(caches)
        self._vocab = model.config.vocab_size
        c, plan, head = model.config, model._block_plan(), model.lm_head
        self._k = [t for cache in self.caches for t in cache.k]
        self._v = [t for cache in self.caches for t in cache.v]
        self._args = (model.embed_tokens.weight, model.embed_scale(), plan.first_norm, model.inv_freq_local,
                      model.inv_freq_global)
        self._rest = (plan.weights, plan.scales, plan.norms, plan.windows, self.caches[0].ring, head.weight,
                      head.scales, c.num_attention_heads, c.attn_scale, c.rms_norm_eps)
        self._native = None
        if model.ops.name == "extension" and model.device.type == "cpu":
            self._native = ops_module.native_module().DecodeSession(*self._args, self._k, self._v, *self._rest)

    def _positions(self, tokens: list[int], slots: list[int]) -> list[int]:
        if len(tokens) != len(slots) or not tokens:
            raise ValueError(f"a batched step takes one slot per token (at least one), got {len(tokens)} tokens and "
                             f"{len(slots)} slots")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} repeat a slot: each sequence steps once per batch")
        for token, slot in zip(tokens, slots):
            if not 0 <= slot < len(self.caches):
                raise ValueError(f"slot {slot} does not exist: the session has {len(self.caches)} slots")
            if not 0 <= token < self._vocab:
                raise ValueError(f"token {token} is not a token id: the vocabulary has {self._vocab} entries")
            self.caches[slot].check_room(1)
        return [self.caches[slot].seq_len for slot in slots]

    @torch.inference_mode()
    def logits(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        positions = self._positions(tokens, slots)
        if self._native is not None:
            out = self._native.logits_batch(tokens, positions, slots)
        else:
            layers = len(self.model.layers)

            def pick(caches: list[torch.Tensor]) -> list[torch.Tensor]:  # the stepping slots' caches, slot-major
                return [caches[s * layers + i] for s in slots for i in range(layers)]

            device = self.model.device
            out = self.model.ops.decoder_forward_batched(
                torch.tensor(tokens, device=device), torch.tensor(positions, device=device), *self._args,
                pick(self._k), pick(self._v), *self._rest)
        for slot in slots:
            self.caches[slot].seq_len += 1
        return out
