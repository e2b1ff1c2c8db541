// RMSNorm's row math, shared by the norm kernels (norm.cpp) and QK-norm + RoPE (rope.cpp): the inverse RMS,
// one row's backward, and the per-thread accumulators of a weight gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "vec.h"

namespace gemma3_fast {

template <typename T>
inline float inv_rms(const T* row, int64_t n, double eps) {
  return 1.f / std::sqrt(vec::sum_squares(row, n) / static_cast<float>(n) + static_cast<float>(eps));
}

// y = x r (1 + w), r = (mean(x^2) + eps)^-1/2. With gw = g (1 + w):
//   dx = r gw - x r^3 mean(gw x),   dw = sum over rows of g x r.
// norm_backward_row writes dx (rounded to TD) and adds g x r into dw_acc (fp32, one per thread).
template <typename TG, typename TX, typename TW, typename TD>
inline void norm_backward_row(TD* dx, const TG* g, const TX* x, const TW* w, float* dw_acc, int64_t n, double eps,
                              float* gw) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) gw[i] = vec::to_f32(g[i]) * (1.f + vec::to_f32(w[i]));
  const float coef = vec::dot(gw, x, n) * r * r * r / static_cast<float>(n);
  int64_t i = 0;
#ifdef GEMMA3_SIMD
  using namespace vec;
  const vf vr = vset(r), vc = vset(coef);
  for (; i + kW <= n; i += kW) {
    const vf xv = vload(x + i);
    vstore(dx + i, vfnma(vc, xv, vmul(vr, vload(gw + i))));
    vstore(dw_acc + i, vfma(vmul(vload(g + i), xv), vr, vload(dw_acc + i)));
  }
#endif
  for (; i < n; ++i) {
    const float xv = vec::to_f32(x[i]);
    dx[i] = vec::from_f32<TD>(r * gw[i] - coef * xv);
    dw_acc[i] += vec::to_f32(g[i]) * xv * r;
  }
}

// Per-thread fp32 weight-gradient rows, summed and rounded to the weight dtype at the end.
struct WeightGrads {
  WeightGrads(int64_t n, int64_t count) : n(n), acc(at::get_num_threads() * count * n, 0.f) {}
  float* of(int64_t which, int64_t count) { return acc.data() + (at::get_thread_num() * count + which) * n; }
  at::Tensor sum(int64_t which, int64_t count, const at::Tensor& like) const {
    at::Tensor out = at::zeros({n}, like.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    for (int64_t t = 0; t < at::get_num_threads(); ++t)
      for (int64_t i = 0; i < n; ++i) o[i] += acc[(t * count + which) * n + i];
    return out.to(like.scalar_type());
  }
  int64_t n;
  std::vector<float> acc;
};

}  // namespace gemma3_fast
