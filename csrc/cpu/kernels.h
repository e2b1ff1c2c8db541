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
void kv_cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, bool ring);
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& positions, int64_t window, double scale);
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales);

}  // namespace gemma3_fast
