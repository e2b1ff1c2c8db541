// RMSNorm and the fused residual-add + two RMSNorms of Gemma's sandwich norms. One row per task.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* wname, double eps) {
  check_float_tensor(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "gemma3_fast: x must have a non-empty last dimension, got shape ",
              x.sizes());
  check_shape(weight, {x.size(-1)}, wname);
  check_same_dtype(weight, x, wname, "x");
  check_same_device(weight, x, wname);
  check_contiguous(weight, wname);
  TORCH_CHECK(eps >= 0, "gemma3_fast: eps must be >= 0, got ", eps);
}

template <typename T>
inline float inv_rms(const T* row, int64_t n, double eps) {
  return 1.f / std::sqrt(vec::sum_squares(row, n) / static_cast<float>(n) + static_cast<float>(eps));
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / n); }  // rows per task: ~32K elements

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, "weight", eps);
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) vec::norm_scale(op + r * n, xp + r * n, wp, inv_rms(xp + r * n, n, eps), n);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& post_weight, const at::Tensor& pre_weight,
                                                    double eps) {
  check_norm_args(x, post_weight, "post_weight", eps);
  check_norm_args(x, pre_weight, "pre_weight", eps);
  TORCH_CHECK(residual.sizes() == x.sizes(), "gemma3_fast: residual has shape ", residual.sizes(),
              " but x has ", x.sizes());
  check_same_dtype(residual, x, "residual", "x");
  check_same_device(residual, x, "residual");
  check_contiguous(residual, "residual");
  at::Tensor h = at::empty_like(x), y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data_ptr<T>(), *rp = residual.data_ptr<T>();
    const T *wpost = post_weight.data_ptr<T>(), *wpre = pre_weight.data_ptr<T>();
    T *hp = h.data_ptr<T>(), *yp = y.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t o = r * n;
        // y's row holds norm(x) (rounded to T, as the reference rounds it) until it is overwritten below.
        vec::norm_scale(yp + o, xp + o, wpost, inv_rms(xp + o, n, eps), n);
        vec::add(hp + o, rp + o, yp + o, n);
        vec::norm_scale(yp + o, hp + o, wpre, inv_rms(hp + o, n, eps), n);
      }
    });
  });
  return {h, y};
}

// -- backward ---------------------------------------------------------------------------------------------
// y = x r (1 + w), r = (mean(x^2) + eps)^-1/2. With gw = g (1 + w):
//   dx = r gw - x r^3 mean(gw x),   dw = sum over rows of g x r.
// norm_backward_row writes dx (rounded to TD) and adds g x r into dw_acc (fp32, one per thread).
namespace {

template <typename TG, typename TX, typename TW, typename TD>
void norm_backward_row(TD* dx, const TG* g, const TX* x, const TW* w, float* dw_acc, int64_t n, double eps,
                       float* gw) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) gw[i] = vec::to_f32(g[i]) * (1.f + vec::to_f32(w[i]));
  const float coef = vec::dot(gw, x, n) * r * r * r / static_cast<float>(n);
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  const __m256 vr = _mm256_set1_ps(r), vc = _mm256_set1_ps(coef);
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = vec::load8(x + i);
    vec::store8(dx + i, _mm256_fnmadd_ps(vc, xv, _mm256_mul_ps(vr, _mm256_loadu_ps(gw + i))));
    vec::store8(dw_acc + i, _mm256_fmadd_ps(_mm256_mul_ps(vec::load8(g + i), xv), vr, _mm256_loadu_ps(dw_acc + i)));
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

void check_grad(const at::Tensor& grad, const at::Tensor& x, const char* name) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "gemma3_fast: ", name, " has shape ", grad.sizes(), " but x has ",
              x.sizes());
  check_same_dtype(grad, x, name, "x");
  check_same_device(grad, x, name);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, "weight", eps);
  check_grad(grad, x, "grad");
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  WeightGrads dw(n, 1);
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *wp = weight.data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      std::vector<float> gw(n);
      float* acc = dw.of(0, 1);
      for (int64_t r = b; r < e; ++r)
        norm_backward_row(dp + r * n, gp + r * n, xp + r * n, wp, acc, n, eps, gw.data());
    });
  });
  return {dx, dw.sum(0, 1, weight)};
}

// Forward: h = residual + round(norm(x, post)); y = norm(h, pre). The roundings pass gradients straight through:
// dh = grad_h + dnorm_pre(grad_y); d residual = dh; dx = dnorm_post(dh).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rms_norm_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
    const at::Tensor& post_weight, const at::Tensor& pre_weight, double eps) {
  check_norm_args(x, post_weight, "post_weight", eps);
  check_norm_args(x, pre_weight, "pre_weight", eps);
  check_grad(grad_h, x, "grad_h");
  check_grad(grad_y, x, "grad_y");
  check_grad(h, x, "h");
  const at::Tensor gh = grad_h.contiguous(), gy = grad_y.contiguous(), hc = h.contiguous();
  at::Tensor dx = at::empty_like(x), dres = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  WeightGrads dw(n, 2);  // 0: post, 1: pre
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data_ptr<T>(), *hp = hc.data_ptr<T>(), *ghp = gh.data_ptr<T>(), *gyp = gy.data_ptr<T>();
    const T *wpost = post_weight.data_ptr<T>(), *wpre = pre_weight.data_ptr<T>();
    T *dxp = dx.data_ptr<T>(), *drp = dres.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      std::vector<float> gw(n), dh(n);
      float *acc_post = dw.of(0, 2), *acc_pre = dw.of(1, 2);
      for (int64_t r = b; r < e; ++r) {
        const int64_t o = r * n;
        norm_backward_row(dh.data(), gyp + o, hp + o, wpre, acc_pre, n, eps, gw.data());
        vec::add(dh.data(), dh.data(), ghp + o, n);  // fp32: rounded once, into d residual
        vec::convert(drp + o, dh.data(), n);
        norm_backward_row(dxp + o, dh.data(), xp + o, wpost, acc_post, n, eps, gw.data());
      }
    });
  });
  return {dx, dres, dw.sum(0, 2, post_weight), dw.sum(1, 2, pre_weight)};
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cpu);
}

}  // namespace gemma3_fast
