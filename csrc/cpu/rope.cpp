// Per-head QK RMSNorm followed by half-split RoPE, one (token, head) row per task; one rounding per output.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

template <typename T>
void norm_rope_row(T* out, const T* x, const T* w, const float* cos, const float* sin, int64_t d, double eps,
                   float* buf) {
  const int64_t half = d / 2;
  const float inv = 1.f / std::sqrt(vec::sum_squares(x, d) / static_cast<float>(d) + static_cast<float>(eps));
  vec::norm_scale(buf, x, w, inv, d);  // fp32, not rounded: RoPE follows
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = buf[i], x2 = buf[i + half];
    out[i] = vec::from_f32<T>(x1 * cos[i] - x2 * sin[i]);
    out[i + half] = vec::from_f32<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps) {
  check_float_tensor(q, "q");
  check_dim(q, 3, "q", "[tokens, q_heads, head_dim]");
  check_dim(k, 3, "k", "[tokens, kv_heads, head_dim]");
  const int64_t t = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  TORCH_CHECK(d % 2 == 0 && d > 0, "gemma3_fast: head_dim must be even and > 0, got ", d);
  check_shape(k, {t, -1, d}, "k");
  check_same_dtype(k, q, "k", "q");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "gemma3_fast: q and k must be contiguous in head_dim");
  check_shape(q_weight, {d}, "q_weight");
  check_shape(k_weight, {d}, "k_weight");
  check_same_dtype(q_weight, q, "q_weight", "q");
  check_same_dtype(k_weight, q, "k_weight", "q");
  for (const auto* p : {&k, &q_weight, &k_weight, &cos, &sin}) check_same_device(*p, q, "q_weight/k_weight/k/cos/sin");
  check_contiguous(q_weight, "q_weight");
  check_contiguous(k_weight, "k_weight");
  for (const auto& [tab, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(tab->scalar_type() == at::kFloat, "gemma3_fast: ", name, " must be float32, got ",
                tab->scalar_type());
    check_shape(*tab, {t, d / 2}, name);
    check_contiguous(*tab, name);
  }
  TORCH_CHECK(eps >= 0, "gemma3_fast: eps must be >= 0, got ", eps);

  at::Tensor q_out = at::empty({t, hq, d}, q.options());
  at::Tensor k_out = at::empty({t, hk, d}, k.options());
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
    const T *qw = q_weight.data_ptr<T>(), *kw = k_weight.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    T *qo = q_out.data_ptr<T>(), *ko = k_out.data_ptr<T>();
    const int64_t heads = hq + hk;
    at::parallel_for(0, t * heads, 16, [&](int64_t b, int64_t e) {
      std::vector<float> buf(d);
      for (int64_t item = b; item < e; ++item) {
        const int64_t ti = item / heads, h = item % heads;
        const float *c = cp + ti * (d / 2), *s = sp + ti * (d / 2);
        if (h < hq) {
          norm_rope_row(qo + (ti * hq + h) * d, qp + ti * q.stride(0) + h * q.stride(1), qw, c, s, d, eps, buf.data());
        } else {
          const int64_t g = h - hq;
          norm_rope_row(ko + (ti * hk + g) * d, kp + ti * k.stride(0) + g * k.stride(1), kw, c, s, d, eps, buf.data());
        }
      }
    });
  });
  return {q_out, k_out};
}

at::Tensor norm_rope_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                         double eps) {
  check_dim(x, 3, "x", "[tokens, heads, head_dim]");
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(d % 2 == 0 && d > 0, "gemma3_fast: head_dim must be even and > 0, got ", d);
  TORCH_CHECK(x.stride(2) == 1, "gemma3_fast: norm_rope: x must be contiguous in head_dim");
  check_shape(weight, {d}, "weight");
  check_same_dtype(weight, x, "weight", "x");
  check_contiguous(weight, "weight");
  for (const auto& [tab, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(tab->scalar_type() == at::kFloat, "gemma3_fast: ", name, " must be float32, got ", tab->scalar_type());
    check_shape(*tab, {t, d / 2}, name);
    check_contiguous(*tab, name);
  }
  at::Tensor out = at::empty({t, heads, d}, x.options());
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data_ptr<T>(), *w = weight.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, t * heads, 16, [&](int64_t b, int64_t e) {
      std::vector<float> buf(d);
      for (int64_t item = b; item < e; ++item) {
        const int64_t ti = item / heads, h = item % heads;
        norm_rope_row(o + item * d, xp + ti * x.stride(0) + h * x.stride(1), w, cp + ti * (d / 2), sp + ti * (d / 2),
                      d, eps, buf.data());
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("qk_norm_rope", &qk_norm_rope_cpu); }

}  // namespace gemma3_fast
