// One whole Gemma 3 block in C++: the same composition as reference_ops.decoder_layer, calling the CPU kernels
// directly. At decode a block is ~12 small ops; run one by one from Python, each pays the interpreter and the
// dispatcher (several microseconds), which added up to 2-4 ms of a 16-20 ms bf16 step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "gguf_blocks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

const char* const kWeightNames[] = {"weights[0] (qkv_proj)", "weights[1] (o_proj)", "weights[2] (gate_up_proj)",
                                    "weights[3] (down_proj)"};

// Columns [col, col + heads * d) of the [t, cols] matrix m as a [t, heads, d] view, made without the dispatcher:
// at decode, narrow + view + contiguous cost ~5 us per block (their code and data evicted between steps). The
// view does not own m's memory: m must outlive it, as it does in the blocks below.
at::Tensor heads_view(const at::Tensor& m, int64_t col, int64_t heads, int64_t d) {
  return at::from_blob(static_cast<char*>(m.data_ptr()) + col * m.element_size(), {m.size(0), heads, d},
                       {m.stride(0), d, 1}, m.options());
}

// A block from its attention output on: o_proj, the residual and post-attention norm, the gated MLP, the residual
// and post-MLP norm (with the next block's input norm). attn [t, heads, d] contiguous, h [t, hidden].
// lin: linear_cpu, or linear_rowwise in a batched step.
using LinearFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

std::tuple<at::Tensor, at::Tensor> block_after_attention(const at::Tensor& attn, const at::Tensor& h,
                                                         at::TensorList weights,
                                                         const c10::List<std::optional<at::Tensor>>& scales,
                                                         at::TensorList norms, double eps, LinearFn lin = linear_cpu) {
  // attn as [t, heads * d], without the dispatcher as above.
  const at::Tensor o = lin(at::from_blob(attn.data_ptr(), {attn.size(0), attn.size(1) * attn.size(2)},
                                                attn.options()),
                                  weights[1], scales.get(1));
  const auto [h1, y1] = add_rms_norm_cpu(o, h, norms[2], norms[3], eps);
  const at::Tensor gate_up = lin(y1, weights[2], scales.get(2));
  const at::Tensor act = gelu_tanh_mul_cpu(gate_up);
  const at::Tensor mlp = lin(act, weights[3], scales.get(3));
  return add_rms_norm_cpu(mlp, h1, norms[4], norms[5], eps);
}

// The last block when only the last token's output is wanted (a prefill that returns the last logits): every
// token's key and value still go to the cache, but q, attention, o_proj and the MLP run for the last token alone,
// as llama.cpp computes only its output rows in the last layer. A 512-token fp32 prefill: 1/18 of its matmul work
// and attention. The keys are written before attention here (decoder_block writes after): the one query is
// the chunk's last token, and the caller checks that the cache keeps every key it needs (last_token_fits).
std::tuple<at::Tensor, at::Tensor> decoder_layer_last_token(const at::Tensor& h, const at::Tensor& y,
                                                            const at::Tensor& positions, const at::Tensor& cos,
                                                            const at::Tensor& sin, at::Tensor& k_cache,
                                                            at::Tensor& v_cache, at::TensorList weights,
                                                            const c10::List<std::optional<at::Tensor>>& scales,
                                                            at::TensorList norms, int64_t num_heads, int64_t window,
                                                            double scale, double eps, bool ring) {
  const int64_t t = h.size(0), d = norms[0].numel(), hq = num_heads;
  const int64_t hk = (weights[0].size(0) / d - hq) / 2;
  // Rows [r0, r0 + n) of the qkv weight and of its int8 scales: views, no copy.
  auto qkv_rows = [&](int64_t r0, int64_t n) {
    const std::optional<at::Tensor> s = scales.get(0);
    return std::pair{weights[0].narrow(0, r0, n), s ? std::optional<at::Tensor>(s->narrow(0, r0, n)) : s};
  };
  const auto [w_kv, s_kv] = qkv_rows(hq * d, 2 * hk * d);
  const auto [w_q, s_q] = qkv_rows(0, hq * d);
  const at::Tensor kv = linear_cpu(y, w_kv, s_kv);  // [t, 2 * hk * d]: every token's key and value
  const at::Tensor k = norm_rope_cpu(heads_view(kv, 0, hk, d), norms[1], cos, sin, eps);
  const at::Tensor v = heads_view(kv, hk * d, hk, d).contiguous();
  kv_cache_write_cpu(k_cache, v_cache, k, v, positions, ring);
  auto last = [t](const at::Tensor& x) { return x.narrow(0, t - 1, 1); };  // contiguous: rows of contiguous
  const at::Tensor q_proj = linear_cpu(last(y), w_q, s_q);  // [1, hq * d]
  const at::Tensor q = norm_rope_cpu(heads_view(q_proj, 0, hq, d), norms[0], last(cos), last(sin), eps);
  const at::Tensor attn = attention_cpu(q, last(k), last(v), k_cache, v_cache, last(positions), window, scale);
  return block_after_attention(attn, last(h), weights, scales, norms, eps);
}

// Whether decoder_layer_last_token can run this block: writing the chunk's keys before attention must not
// overwrite a key that the last token (position p) attends to. A ring keeps the last `slots` positions.
bool last_token_fits(const at::Tensor& k_cache, const at::Tensor& positions, int64_t window, bool ring) {
  const int64_t t = positions.size(0), p = positions.data_ptr<int64_t>()[t - 1];
  const int64_t seen = window > 0 ? std::min(window - 1, p) : p;  // cached keys the last query reads
  return t > 1 && (!ring || k_cache.size(0) > seen);
}

// One block. last_token_only: the caller wants only the last token's output ([1, hidden] then), and the block
// may skip the other tokens' work where decoder_layer_last_token can run it.
// The checks of one block's arguments (decoder_block and decoder_block_batched); returns kv_heads.
int64_t check_block_args(const at::Tensor& h, const at::Tensor& y, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& scales, at::TensorList norms,
                         int64_t num_heads) {
  TORCH_CHECK(weights.size() == 4, "gemma3_fast: decoder_layer takes 4 weights [qkv, o, gate_up, down], got ",
              weights.size());
  TORCH_CHECK(scales.size() == 4, "gemma3_fast: decoder_layer takes 4 scales (None unless int8), got ",
              scales.size());
  TORCH_CHECK(norms.size() == 6, "gemma3_fast: decoder_layer takes 6 norms [q, k, post_attn, pre_ff, post_ff, ",
              "next], got ", norms.size());
  check_dim(h, 2, "h", "[tokens, hidden]");
  TORCH_CHECK(y.sizes() == h.sizes(), "gemma3_fast: y has shape ", y.sizes(), " but h has ", h.sizes());
  TORCH_CHECK(num_heads > 0, "gemma3_fast: num_heads must be > 0, got ", num_heads);
  int64_t in[4];  // in_features of each weight ([out, in], or GGUF blocks [out, blocks, bytes])
  for (size_t i = 0; i < 4; ++i) {
    if (!gguf::is_block_weight(weights[i])) check_dim(weights[i], 2, kWeightNames[i], "[out_features, in_features]");
    else gguf::block_format(weights[i], kWeightNames[i]);
    in[i] = gguf::in_features(weights[i]);
  }
  const int64_t hidden = h.size(1), d = norms[0].numel();
  const int64_t qkv_heads = d > 0 ? weights[0].size(0) / d : 0;
  TORCH_CHECK(d > 0 && weights[0].size(0) % d == 0 && qkv_heads > num_heads && (qkv_heads - num_heads) % 2 == 0,
              "gemma3_fast: ", kWeightNames[0], " has ", weights[0].size(0), " rows, expected (num_heads + 2 * ",
              "kv_heads) * head_dim with num_heads=", num_heads, " and head_dim=", d, " (the q norm's size)");
  const int64_t hk = (qkv_heads - num_heads) / 2, inter2 = weights[2].size(0);
  TORCH_CHECK(in[1] == num_heads * d, "gemma3_fast: ", kWeightNames[1], " has in_features ", in[1],
              ", expected num_heads * head_dim = ", num_heads * d);
  TORCH_CHECK(inter2 % 2 == 0 && in[3] == inter2 / 2, "gemma3_fast: ", kWeightNames[2], " has ", inter2,
              " rows, expected twice ", kWeightNames[3], "'s in_features (", in[3], ")");
  TORCH_CHECK(weights[1].size(0) == hidden && weights[3].size(0) == hidden, "gemma3_fast: o_proj and down_proj ",
              "must have ", hidden, " (hidden) rows, got ", weights[1].size(0), " and ", weights[3].size(0));
  return hk;
}

std::tuple<at::Tensor, at::Tensor> decoder_block(const at::Tensor& h, const at::Tensor& y, const at::Tensor& positions,
                                                 const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                                                 at::Tensor& v_cache, at::TensorList weights,
                                                 const c10::List<std::optional<at::Tensor>>& scales,
                                                 at::TensorList norms, int64_t num_heads, int64_t window,
                                                 double scale, double eps, bool ring, bool write_cache,
                                                 bool last_token_only) {
  const int64_t hk = check_block_args(h, y, weights, scales, norms, num_heads), t = h.size(0), d = norms[0].numel();
  if (last_token_only && write_cache && last_token_fits(k_cache, positions, window, ring))
    return decoder_layer_last_token(h, y, positions, cos, sin, k_cache, v_cache, weights, scales, norms, num_heads,
                                    window, scale, eps, ring);

  const at::Tensor qkv = linear_cpu(y, weights[0], scales.get(0));
  const at::Tensor q = heads_view(qkv, 0, num_heads, d), k = heads_view(qkv, num_heads * d, hk, d);
  const at::Tensor v_view = heads_view(qkv, (num_heads + hk) * d, hk, d);
  const at::Tensor v = t == 1 ? v_view : v_view.contiguous();  // one token: already contiguous
  const auto [qr, kr] = qk_norm_rope_cpu(q, k, norms[0], norms[1], cos, sin, eps);
  const at::Tensor attn = attention_cpu(qr, kr, v, k_cache, v_cache, positions, window, scale);
  if (write_cache)  // after attention: a chunk longer than the ring still attends to its own keys
    kv_cache_write_cpu(k_cache, v_cache, kr, v, positions, ring);
  return block_after_attention(attn, h, weights, scales, norms, eps);
}

// linear_cpu of the rows of x in groups that the bandwidth-bound kernel takes whole (gemv_token_limit): each
// row then gets the arithmetic it gets alone, so a sequence's logits do not depend on its batch (a matmul over
// more rows would round differently), and each weight is read once per group.
at::Tensor linear_rowwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  const int64_t t = x.size(0), limit = gemv_token_limit(weight);
  if (t <= limit) return linear_cpu(x, weight, scales);
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < t; r += limit) parts.push_back(linear_cpu(x.narrow(0, r, std::min(limit, t - r)), weight,
                                                                    scales));
  return at::cat(parts);
}

// One block for B sequences, one token each: row b is sequence b's token at positions[b], attending over its own
// caches k_caches[b], v_caches[b]. The projections read each weight once for all rows (linear_rowwise); attention
// and the cache write run per sequence, through the same kernels as a batch-1 step.
std::tuple<at::Tensor, at::Tensor> decoder_block_batched(const at::Tensor& h, const at::Tensor& y,
                                                         const at::Tensor& positions, const at::Tensor& cos,
                                                         const at::Tensor& sin, std::vector<at::Tensor>& k_caches,
                                                         std::vector<at::Tensor>& v_caches, at::TensorList weights,
                                                         const c10::List<std::optional<at::Tensor>>& scales,
                                                         at::TensorList norms, int64_t num_heads, int64_t window,
                                                         double scale, double eps, bool ring) {
  const int64_t hk = check_block_args(h, y, weights, scales, norms, num_heads), b = h.size(0), d = norms[0].numel();
  const at::Tensor qkv = linear_rowwise(y, weights[0], scales.get(0));
  const at::Tensor q = heads_view(qkv, 0, num_heads, d), k = heads_view(qkv, num_heads * d, hk, d);
  const at::Tensor v = heads_view(qkv, (num_heads + hk) * d, hk, d).contiguous();
  const auto [qr, kr] = qk_norm_rope_cpu(q, k, norms[0], norms[1], cos, sin, eps);
  at::Tensor attn = at::empty_like(qr);
  const int64_t row_bytes = attn.stride(0) * attn.element_size();
  // The sequences are spread over the threads, each one's attention run whole by one thread (the kernels'
  // parallel_for runs inline inside this one, with the same work split as a batch-1 step: the same sums). Run one
  // after another, each sequence's short attention had paid two fork-joins of both threads: 288 a step at B = 8.
  at::parallel_for(0, b, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i) {
      auto row = [i](const at::Tensor& x) { return x.narrow(0, i, 1); };  // contiguous: rows of contiguous
      const at::Tensor a = attention_cpu(row(qr), row(kr), row(v), k_caches[i], v_caches[i], row(positions),
                                         window, scale);
      std::memcpy(static_cast<char*>(attn.data_ptr()) + i * row_bytes, a.data_ptr(), row_bytes);
      kv_cache_write_cpu(k_caches[i], v_caches[i], row(kr), row(v), row(positions), ring);
    }
  });
  return block_after_attention(attn, h, weights, scales, norms, eps, linear_rowwise);
}

std::tuple<at::Tensor, at::Tensor> decoder_layer_cpu(const at::Tensor& h, const at::Tensor& y,
                                                     const at::Tensor& positions, const at::Tensor& cos,
                                                     const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                                     at::TensorList weights,
                                                     const c10::List<std::optional<at::Tensor>>& scales,
                                                     at::TensorList norms, int64_t num_heads, int64_t window,
                                                     double scale, double eps, bool ring, bool write_cache) {
  return decoder_block(h, y, positions, cos, sin, k_cache, v_cache, weights, scales, norms, num_heads, window, scale,
                       eps, ring, write_cache, /*last_token_only=*/false);
}

// All blocks in one call. A decode step called decoder_layer once per block from Python: per call, the
// interpreter, the argument parsing of ~20 arguments and the dispatcher, with their data evicted from the caches
// by the weights streaming past in between. Argument i of each per-block list is taken from slice i.
// last_token_only: only the last token's output is wanted; the last block may then run for it alone.
std::tuple<at::Tensor, at::Tensor> decoder_blocks(const at::Tensor& h, const at::Tensor& y,
                                                  const at::Tensor& positions, at::TensorList rope,
                                                  at::TensorList k_caches, at::TensorList v_caches,
                                                  at::TensorList weights,
                                                  const c10::List<std::optional<at::Tensor>>& scales,
                                                  at::TensorList norms, at::IntArrayRef windows,
                                                  const c10::List<bool>& ring, int64_t num_heads, double scale,
                                                  double eps, bool write_cache, bool last_token_only) {
  const size_t n = windows.size();
  TORCH_CHECK(n > 0, "gemma3_fast: decoder_layers needs at least one layer (windows is empty)");
  auto check_count = [n](size_t got, size_t per_layer, const char* name, const char* what) {
    TORCH_CHECK(got == per_layer * n, "gemma3_fast: decoder_layers takes ", per_layer, " ", name, " per layer (",
                what, "): ", n, " layers (the length of windows) need ", per_layer * n, ", got ", got);
  };
  check_count(rope.size(), 2, "rope tensors", "cos, sin");
  check_count(k_caches.size(), 1, "k_cache", "the layer's key cache");
  check_count(v_caches.size(), 1, "v_cache", "the layer's value cache");
  check_count(weights.size(), 4, "weights", "qkv, o, gate_up, down");
  check_count(scales.size(), 4, "scales", "None unless int8");
  check_count(norms.size(), 6, "norms", "q, k, post_attn, pre_ff, post_ff, next");
  check_count(ring.size(), 1, "ring flag", "its cache is a ring");
  at::Tensor hh = h, yy = y;
  for (size_t i = 0; i < n; ++i) {
    c10::List<std::optional<at::Tensor>> layer_scales;
    layer_scales.reserve(4);
    for (size_t j = 0; j < 4; ++j) layer_scales.push_back(scales.get(4 * i + j));
    at::Tensor k_cache = k_caches[i], v_cache = v_caches[i];
    try {
      std::tie(hh, yy) = decoder_block(hh, yy, positions, rope[2 * i], rope[2 * i + 1], k_cache, v_cache,
                                       weights.slice(4 * i, 4), layer_scales, norms.slice(6 * i, 6), num_heads,
                                       windows[i], scale, eps, ring.get(i), write_cache,
                                       last_token_only && i + 1 == n);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "gemma3_fast: decoder_layers, layer ", i, ": ", e.what_without_backtrace());
    }
  }
  return {hh, yy};
}

std::tuple<at::Tensor, at::Tensor> decoder_layers_cpu(const at::Tensor& h, const at::Tensor& y,
                                                      const at::Tensor& positions, at::TensorList rope,
                                                      at::TensorList k_caches, at::TensorList v_caches,
                                                      at::TensorList weights,
                                                      const c10::List<std::optional<at::Tensor>>& scales,
                                                      at::TensorList norms, at::IntArrayRef windows,
                                                      const c10::List<bool>& ring, int64_t num_heads, double scale,
                                                      double eps, bool write_cache) {
  return decoder_blocks(h, y, positions, rope, k_caches, v_caches, weights, scales, norms, windows, ring, num_heads,
                        scale, eps, write_cache, /*last_token_only=*/false);
}

}  // namespace

namespace {

// What every block of a step takes from the ids and positions: h (embedding rows x embed_scale, in the weights'
// dtype, fp32 for GGUF blocks), y (the first block's input norm of h), and per layer its RoPE tables (cos, sin).
struct StepInputs {
  at::Tensor h, y;
  std::vector<at::Tensor> rope;
};

// embed_scales: the per-row scales of an int8 embed_weight (the tied int8 head, looked up in place of a second,
// bf16 copy of the table); ignored for the other weight kinds.
StepInputs step_inputs(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed_weight,
                       const std::optional<at::Tensor>& embed_scales, double embed_scale, const at::Tensor& first_norm,
                       const at::Tensor& inv_freq_local, const at::Tensor& inv_freq_global, at::IntArrayRef windows,
                       double eps) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.numel() > 0, "gemma3_fast: ids must be a "
              "non-empty int64 tensor [tokens], got ", ids.scalar_type(), " of shape ", ids.sizes());
  check_contiguous(ids, "ids");
  const bool blocks = gguf::is_block_weight(embed_weight);  // GGUF blocks: rows dequantized, fp32 activations
  const bool int8 = embed_weight.scalar_type() == at::kChar;  // rows times their scale, in first_norm's dtype
  if (blocks) {
    gguf::block_format(embed_weight, "embed_weight");
  } else {
    check_dim(embed_weight, 2, "embed_weight", "[vocab, hidden]");
    if (!int8) check_float_tensor(embed_weight, "embed_weight");
  }
  if (int8) {
    TORCH_CHECK(embed_scales.has_value(), "gemma3_fast: an int8 embed_weight is the tied int8 head and is looked up ",
                "with head_scales, but head_scales is None");
    TORCH_CHECK(embed_scales->scalar_type() == at::kFloat, "gemma3_fast: head_scales must be float32, got ",
                embed_scales->scalar_type());
    check_shape(*embed_scales, {embed_weight.size(0)}, "head_scales (the int8 embed_weight's scales)");
    check_contiguous(*embed_scales, "head_scales");
    check_float_tensor(first_norm, "first_norm");
  }
  check_same_device(ids, embed_weight, "ids");
  const int64_t vocab = embed_weight.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < vocab, "gemma3_fast: ids[", i, "] = ", id[i], " is not a token id: the ",
                "embedding has ", vocab, " rows");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "gemma3_fast: positions must be int64, got ",
              positions.scalar_type());
  check_shape(positions, {ids.numel()}, "positions");
  check_contiguous(positions, "positions");
  for (const auto& [inv, name] : {std::pair{&inv_freq_local, "inv_freq_local"}, {&inv_freq_global, "inv_freq_global"}}) {
    TORCH_CHECK(inv->scalar_type() == at::kFloat && inv->dim() == 1, "gemma3_fast: ", name, " must be float32 ",
                "[head_dim / 2], got ", inv->scalar_type(), " of shape ", inv->sizes());
  }
  // Loops instead of ATen calls here: at decode each call cost 5-40 us, its code and data evicted by the weights
  // streaming past between steps (embedding + mul_ took 82 us, the ten ops of the RoPE tables 48).
  // h = embedding rows x embed_scale, rounded once to the weight dtype, as embedding(...).mul_(embed_scale) does.
  // int8 rows: (q * row scale) * embed_scale in fp32, rounded once to first_norm's dtype (the activations').
  const int64_t t = ids.numel(), hidden = gguf::in_features(embed_weight);
  check_contiguous(embed_weight, "embed_weight");
  const at::ScalarType h_type = blocks ? at::kFloat : int8 ? first_norm.scalar_type() : embed_weight.scalar_type();
  at::Tensor h = at::empty({t, hidden}, embed_weight.options().dtype(h_type));
  if (blocks) block_embedding_rows(embed_weight, id, t, static_cast<float>(embed_scale), h.data_ptr<float>());
  else if (int8) dispatch_float_bf16(h_type, [&](auto tag) {
    using T = decltype(tag);
    const int8_t* e = embed_weight.data_ptr<int8_t>();
    const float* rs = embed_scales->data_ptr<float>();
    T* out = h.data_ptr<T>();
    const float s = static_cast<float>(embed_scale);
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < hidden; ++j)
        out[i * hidden + j] = vec::from_f32<T>(static_cast<float>(e[id[i] * hidden + j]) * rs[id[i]] * s);
  });
  else dispatch_float_bf16(embed_weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* e = embed_weight.data_ptr<T>();
    T* out = h.data_ptr<T>();
    const float s = static_cast<float>(embed_scale);
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < hidden; ++j) out[i * hidden + j] = vec::from_f32<T>(vec::to_f32(e[id[i] * hidden + j]) * s);
  });
  const at::Tensor y = rms_norm_cpu(h, first_norm, eps);
  // cos and sin of positions x inv_freq, as reference_ops.rope_cos_sin computes them, one table per base: the
  // angles (one fp32 product each, as torch's) of both bases in one tensor, then torch's own cos and sin.
  TORCH_CHECK(inv_freq_global.numel() == inv_freq_local.numel(), "gemma3_fast: inv_freq_local and inv_freq_global "
              "must have the same size (head_dim / 2), got ", inv_freq_local.numel(), " and ", inv_freq_global.numel());
  const int64_t half = inv_freq_local.numel();
  at::Tensor angles = at::empty({2, t, half}, inv_freq_local.options());
  {
    const int64_t* pos = positions.data_ptr<int64_t>();
    const at::Tensor inv_local = inv_freq_local.contiguous(), inv_global = inv_freq_global.contiguous();
    const float* inv[2] = {inv_local.data_ptr<float>(), inv_global.data_ptr<float>()};
    float* a = angles.data_ptr<float>();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < half; ++j) a[(b * t + i) * half + j] = static_cast<float>(pos[i]) * inv[b][j];
  }
  // Per base, so that torch's cos and sin see the same [t, half] tensors as in the reference, split into vectors
  // and threads alike: bit-equal tables.
  auto base_angles = [&](int64_t base) {  // a view without a dispatcher call
    return at::from_blob(angles.data_ptr<float>() + base * t * half, {t, half}, angles.options());
  };
  const at::Tensor local = base_angles(0), global = base_angles(1);
  const at::Tensor tables[4] = {local.cos(), local.sin(), global.cos(), global.sin()};
  std::vector<at::Tensor> rope;
  rope.reserve(2 * windows.size());
  for (const int64_t window : windows) {
    rope.push_back(tables[window ? 0 : 2]);
    rope.push_back(tables[window ? 1 : 3]);
  }
  return {h, y, rope};
}

}  // namespace

// The whole forward up to the head (decoder_forward_cpu below adds it). At decode the steps around the blocks
// (embedding, first norm, RoPE tables, head) were ~10 ATen calls from Python, each 15-25 us there: the weights
// streaming past evict the interpreter's and the dispatcher's code and data from every cache, so a call that
// takes 2-5 us in a warm loop costs several times that once per step.
at::Tensor decoder_hidden_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed_weight,
                              const std::optional<at::Tensor>& embed_scales, double embed_scale,
                              const at::Tensor& first_norm, const at::Tensor& inv_freq_local,
                              const at::Tensor& inv_freq_global, at::TensorList k_caches, at::TensorList v_caches,
                              at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                              at::TensorList norms, at::IntArrayRef windows, const c10::List<bool>& ring,
                              int64_t num_heads, double scale, double eps, bool write_cache, bool last_token_only) {
  const StepInputs in = step_inputs(ids, positions, embed_weight, embed_scales, embed_scale, first_norm,
                                    inv_freq_local, inv_freq_global, windows, eps);
  return std::get<1>(decoder_blocks(in.h, in.y, positions, in.rope, k_caches, v_caches, weights, scales, norms,
                                    windows, ring, num_heads, scale, eps, write_cache, last_token_only));
}

// One decode step of B sequences (decoder_forward_batched without the head): ids[b] at positions[b], sequence b's
// caches k_caches[b * L + i] for layer i of L. Returns the final-normed hidden states [B, hidden].
at::Tensor decoder_hidden_batched_cpu(const at::Tensor& ids, const at::Tensor& positions,
                                      const at::Tensor& embed_weight, const std::optional<at::Tensor>& embed_scales,
                                      double embed_scale, const at::Tensor& first_norm,
                                      const at::Tensor& inv_freq_local, const at::Tensor& inv_freq_global,
                                      at::TensorList k_caches, at::TensorList v_caches, at::TensorList weights,
                                      const c10::List<std::optional<at::Tensor>>& scales, at::TensorList norms,
                                      at::IntArrayRef windows, const c10::List<bool>& ring, int64_t num_heads,
                                      double scale, double eps) {
  const size_t n = windows.size(), b = static_cast<size_t>(ids.numel());
  TORCH_CHECK(n > 0, "gemma3_fast: decoder_forward_batched needs at least one layer (windows is empty)");
  TORCH_CHECK(weights.size() == 4 * n && scales.size() == 4 * n && norms.size() == 6 * n && ring.size() == n,
              "gemma3_fast: decoder_forward_batched takes 4 weights, 4 scales, 6 norms and 1 ring flag per layer: ",
              n, " layers (the length of windows), got ", weights.size(), ", ", scales.size(), ", ", norms.size(),
              " and ", ring.size());
  TORCH_CHECK(k_caches.size() == b * n && v_caches.size() == b * n, "gemma3_fast: decoder_forward_batched takes ",
              "one k_cache and one v_cache per sequence and layer (sequence b's layer i at b * layers + i): ", b,
              " sequences x ", n, " layers need ", b * n, ", got ", k_caches.size(), " and ", v_caches.size());
  const StepInputs in = step_inputs(ids, positions, embed_weight, embed_scales, embed_scale, first_norm,
                                    inv_freq_local, inv_freq_global, windows, eps);
  at::Tensor h = in.h, y = in.y;
  std::vector<at::Tensor> k(b), v(b);
  for (size_t i = 0; i < n; ++i) {
    c10::List<std::optional<at::Tensor>> layer_scales;
    for (size_t j = 0; j < 4; ++j) layer_scales.push_back(scales.get(4 * i + j));
    for (size_t s = 0; s < b; ++s) {
      k[s] = k_caches[s * n + i];
      v[s] = v_caches[s * n + i];
    }
    try {
      std::tie(h, y) = decoder_block_batched(h, y, positions, in.rope[2 * i], in.rope[2 * i + 1], k, v,
                                             weights.slice(4 * i, 4), layer_scales, norms.slice(6 * i, 6), num_heads,
                                             windows[i], scale, eps, ring.get(i));
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "gemma3_fast: decoder_forward_batched, layer ", i, ": ", e.what_without_backtrace());
    }
  }
  return y;
}

// The output head of a batched step: linear_rowwise, so that each row's logits are the ones it gets alone.
at::Tensor batched_head_cpu(const at::Tensor& y, const at::Tensor& head_weight,
                            const std::optional<at::Tensor>& head_scales) {
  try {
    return linear_rowwise(y, head_weight, head_scales);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "gemma3_fast: decoder_forward_batched, the output head (head_weight, head_scales): ",
                e.what_without_backtrace());
  }
}

at::Tensor decoder_forward_batched_cpu(const at::Tensor& ids, const at::Tensor& positions,
                                       const at::Tensor& embed_weight, double embed_scale,
                                       const at::Tensor& first_norm, const at::Tensor& inv_freq_local,
                                       const at::Tensor& inv_freq_global, at::TensorList k_caches,
                                       at::TensorList v_caches, at::TensorList weights,
                                       const c10::List<std::optional<at::Tensor>>& scales, at::TensorList norms,
                                       at::IntArrayRef windows, const c10::List<bool>& ring,
                                       const at::Tensor& head_weight, const std::optional<at::Tensor>& head_scales,
                                       int64_t num_heads, double scale, double eps) {
  const at::Tensor y = decoder_hidden_batched_cpu(ids, positions, embed_weight, head_scales, embed_scale,
                                                  first_norm, inv_freq_local, inv_freq_global, k_caches, v_caches,
                                                  weights, scales, norms, windows, ring, num_heads, scale, eps);
  return batched_head_cpu(y, head_weight, head_scales);
}

at::Tensor decoder_forward_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed_weight,
                               double embed_scale, const at::Tensor& first_norm, const at::Tensor& inv_freq_local,
                               const at::Tensor& inv_freq_global, at::TensorList k_caches, at::TensorList v_caches,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                               at::TensorList norms, at::IntArrayRef windows, const c10::List<bool>& ring,
                               const at::Tensor& head_weight, const std::optional<at::Tensor>& head_scales,
                               int64_t num_heads, double scale, double eps, bool write_cache, bool all_logits) {
  const at::Tensor y_out = decoder_hidden_cpu(ids, positions, embed_weight, head_scales, embed_scale, first_norm,
                                              inv_freq_local, inv_freq_global, k_caches, v_caches, weights, scales,
                                              norms, windows, ring, num_heads, scale, eps, write_cache, !all_logits);
  try {
    return linear_cpu(all_logits ? y_out : y_out.narrow(0, y_out.size(0) - 1, 1), head_weight, head_scales);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "gemma3_fast: decoder_forward, the output head (head_weight, head_scales): ",
                e.what_without_backtrace());
  }
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) {
  m.impl("decoder_layer", &decoder_layer_cpu);
  m.impl("decoder_layers", &decoder_layers_cpu);
  m.impl("decoder_forward", &decoder_forward_cpu);
  m.impl("decoder_forward_batched", &decoder_forward_batched_cpu);
}

}  // namespace gemma3_fast
