// RMSNorm and the fused residual-add + two RMSNorms of Gemma's sandwich norms. One row per task.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "norm_rows.h"
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

// -- backward ----------------------------------------------------------------------------------------------
namespace {

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
