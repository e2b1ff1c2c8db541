// Input checks shared by the CPU and CUDA kernels: every message names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace gemma3_fast {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "gemma3_fast: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "gemma3_fast: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "gemma3_fast: ", name, " is on ", t.device(), " but the op runs on ",
              ref.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "gemma3_fast: ", name, " must be contiguous (call .contiguous()), got strides ",
              t.strides());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "gemma3_fast: ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// -1 in `sizes` accepts any size in that dimension.
inline void check_shape(const at::Tensor& t, std::initializer_list<int64_t> sizes, const char* name) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (int64_t s : sizes) {
    if (!ok) break;
    ok = (s < 0 || t.size(d) == s);
    ++d;
  }
  TORCH_CHECK(ok, "gemma3_fast: ", name, " has shape ", t.sizes(), ", expected ", c10::IntArrayRef(sizes),
              " (-1 = any)");
}

inline void check_positions(const at::Tensor& positions, int64_t tokens, const at::Tensor& ref) {
  TORCH_CHECK(positions.scalar_type() == at::kLong, "gemma3_fast: positions must be int64, got ",
              positions.scalar_type());
  check_shape(positions, {tokens}, "positions");
  check_contiguous(positions, "positions");
  check_same_device(positions, ref, "positions");
}

}  // namespace gemma3_fast

namespace gemma3_fast {

// Calls f(T{}) with T = float or c10::BFloat16 (the two dtypes the kernels take; checked before).
template <typename F>
inline void dispatch_float_bf16(at::ScalarType st, const F& f) {
  if (st == at::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

}  // namespace gemma3_fast

namespace gemma3_fast {

// Defined in cpu/kv_cache.cpp and cpu/attention.cpp; the CUDA kernels run the same checks.
void check_kv_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v);
// Checks attention's arguments and returns positions[0] (positions must already be readable on the host).
int64_t check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& positions_cpu, int64_t window);
// Checks causal_attention's q [B,T,Hq,D], k and v [B,T,Hk,D] (contiguous, one dtype) and window (cpu/attention.cpp).
void check_causal_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window);

}  // namespace gemma3_fast
