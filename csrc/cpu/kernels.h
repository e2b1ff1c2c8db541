// The CPU kernels of the gemma3_fast ops, callable from C++: each is registered with TORCH_LIBRARY_IMPL in
// its own file, and decoder_layer.cpp calls them directly to run a whole block without a round trip through
// Python and the dispatcher per op.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace gemma3_fast {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& post_weight, const at::Tensor& pre_weight,
                                                    double eps);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps);
// One of qk_norm_rope_cpu's halves: per-head RMSNorm + RoPE of x [t, heads, head_dim] (strided over t and heads).
at::Tensor norm_rope_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                         double eps);
void kv_cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, bool ring);
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& positions, int64_t window, double scale);
// gate_up [..., 2I] -> gelu_tanh(gate) * up [..., I] in one fp32 pass, rounded once.
at::Tensor gelu_tanh_mul_cpu(const at::Tensor& gate_up);
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales);
at::Tensor argmax_cpu(const at::Tensor& x);
// fp32 x @ w^T through oneDNN's matmul where torch has it (the prefill matmul), else torch's.
at::Tensor matmul_fp32(const at::Tensor& x, const at::Tensor& w);
// linear_cpu and linear_argmax_cpu on GGUF blocks (gguf_linear.cpp); linear_cpu sends such weights there.
at::Tensor block_linear_cpu(const at::Tensor& x, const at::Tensor& weight);
int64_t block_linear_argmax_cpu(const at::Tensor& x, const at::Tensor& weight);
// The GGUF decode kernels' fast mode (process-wide, off by default): activations quantized to int16 per token,
// as the int8 weights' kernel does, instead of exact fp32 products. Prefill (dequantized tiles) stays fp32.
void set_gguf_int16_activations(bool on);
bool gguf_int16_activations();
bool gguf_int16_available();  // whether this build has the int16 kernels (AVX2 builds)
// out[i] = dequantized row ids[i] of the block weight, times scale: the embedding lookup of a GGUF token_embd.
void block_embedding_rows(const at::Tensor& weight, const int64_t* ids, int64_t count, float scale, float* out);
// argmax_cpu(linear_cpu(x, weight, scales)) of one token x [1, K] (or [K]), found while the logits are written.
int64_t linear_argmax_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales);
// decoder_forward up to the head: the last block's output (final norm applied) [T, hidden], or with
// last_token_only [1, hidden], the last token's (the last block may then skip the other tokens' work).
at::Tensor decoder_hidden_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed_weight,
                              const std::optional<at::Tensor>& embed_scales, double embed_scale,
                              const at::Tensor& first_norm, const at::Tensor& inv_freq_local,
                              const at::Tensor& inv_freq_global, at::TensorList k_caches, at::TensorList v_caches,
                              at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                              at::TensorList norms, at::IntArrayRef windows, const c10::List<bool>& ring,
                              int64_t num_heads, double scale, double eps, bool write_cache, bool last_token_only);
// One decode step of B sequences, each at its own position over its own caches (sequence b's layer i:
// k_caches[b * layers + i]): the final-normed hidden states [B, hidden], and the head over them. Each row's
// arithmetic is the same as in a batch-1 step (decoder_hidden_cpu, linear_cpu): batch-invariant logits.
at::Tensor decoder_hidden_batched_cpu(const at::Tensor& ids, const at::Tensor& positions,
                                      const at::Tensor& embed_weight, const std::optional<at::Tensor>& embed_scales,
                                      double embed_scale, const at::Tensor& first_norm,
                                      const at::Tensor& inv_freq_local, const at::Tensor& inv_freq_global,
                                      at::TensorList k_caches, at::TensorList v_caches, at::TensorList weights,
                                      const c10::List<std::optional<at::Tensor>>& scales, at::TensorList norms,
                                      at::IntArrayRef windows, const c10::List<bool>& ring, int64_t num_heads,
                                      double scale, double eps);
at::Tensor batched_head_cpu(const at::Tensor& y, const at::Tensor& head_weight,
                            const std::optional<at::Tensor>& head_scales);
// The most tokens linear_cpu runs through its bandwidth-bound kernel on this weight (one pass over the weight,
// each token's arithmetic independent of the others'); beyond it, a matmul.
int64_t gemv_token_limit(const at::Tensor& weight);
int64_t block_gemv_token_limit();
at::Tensor decoder_forward_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed_weight,
                               double embed_scale, const at::Tensor& first_norm, const at::Tensor& inv_freq_local,
                               const at::Tensor& inv_freq_global, at::TensorList k_caches, at::TensorList v_caches,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                               at::TensorList norms, at::IntArrayRef windows, const c10::List<bool>& ring,
                               const at::Tensor& head_weight, const std::optional<at::Tensor>& head_scales,
                               int64_t num_heads, double scale, double eps, bool write_cache, bool all_logits);

}  // namespace gemma3_fast
