// Writes new keys/values into the preallocated cache: slot p % S for a ring (sliding layers), p for a linear cache.
#include <torch/library.h>

#include <cstring>

#include "../checks.h"
#include "kernels.h"

namespace gemma3_fast {

// Shared by the CPU and CUDA kernels: the argument checks of kv_cache_write and attention.
void check_kv_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v) {
  check_float_tensor(k, "k");
  check_dim(k, 3, "k", "[tokens, kv_heads, head_dim]");
  check_dim(k_cache, 3, "k_cache", "[slots, kv_heads, head_dim]");
  check_shape(v, {k.size(0), k.size(1), k.size(2)}, "v");
  check_shape(k_cache, {-1, k.size(1), k.size(2)}, "k_cache");
  check_shape(v_cache, {k_cache.size(0), k.size(1), k.size(2)}, "v_cache");
  for (const auto& [t, name] : {std::pair{&v, "v"}, std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_same_dtype(*t, k, name, "k");
    check_same_device(*t, k, name);
  }
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&k_cache, "k_cache"},
                                std::pair{&v_cache, "v_cache"}})
    check_contiguous(*t, name);
}

void kv_cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, bool ring) {
  check_kv_args(k_cache, v_cache, k, v);
  const int64_t t = k.size(0), slots = k_cache.size(0), row = k.size(1) * k.size(2);
  check_positions(positions, t, k);
  TORCH_CHECK(slots > 0, "gemma3_fast: k_cache has no slots");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(pos[i] >= 0, "gemma3_fast: positions[", i, "] = ", pos[i], " is negative");
    TORCH_CHECK(ring || pos[i] < slots, "gemma3_fast: positions[", i, "] = ", pos[i],
                " is outside the linear cache of ", slots, " slots");
  }
  const int64_t first = ring ? std::max<int64_t>(0, t - slots) : 0;  // a ring keeps only the last `slots` tokens
  const int64_t bytes = row * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t i = first; i < t; ++i) {
    const int64_t slot = pos[i] % slots;
    std::memcpy(kc + slot * bytes, kp + i * bytes, bytes);
    std::memcpy(vc + slot * bytes, vp + i * bytes, bytes);
  }
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }

}  // namespace gemma3_fast
