// Per-head QK RMSNorm followed by half-split RoPE, one (token, head) row per task; one rounding per output.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "norm_rows.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

template <typename T>
void norm_rope_row(T* out, const T* x, const T* w, const float* cos, const float* sin, int64_t d, double eps,
                   float* buf) {
  const int64_t half = d / 2;
  const float inv = inv_rms(x, d, eps);
  vec::norm_scale(buf, x, w, inv, d);  // fp32, not rounded: RoPE follows
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = buf[i], x2 = buf[i + half];
    out[i] = vec::from_f32<T>(x1 * cos[i] - x2 * sin[i]);
    out[i + half] = vec::from_f32<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

}  // namespace

namespace {

// q or k as rows of head_dim: [T, H, D] (one sequence) or [B, T, H, D] (a training batch, every row from
// position 0: the cos/sin row of token (b, t) is t). Any strides except along head_dim.
struct HeadRows {
  HeadRows(const at::Tensor& x) : batched(x.dim() == 4) {
    b = batched ? x.size(0) : 1;
    t = x.size(-3), h = x.size(-2), d = x.size(-1);
    sb = batched ? x.stride(0) : 0, st = x.stride(-3), sh = x.stride(-2);
  }
  int64_t rows() const { return b * t * h; }
  int64_t token(int64_t row) const { return (row / h) % t; }  // index into cos/sin
  int64_t offset(int64_t row) const { return (row / (h * t)) * sb + token(row) * st + (row % h) * sh; }
  bool batched;
  int64_t b, t, h, d, sb, st, sh;
};

void check_qk_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                   const at::Tensor& cos, const at::Tensor& sin, double eps) {
  check_float_tensor(q, "q");
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "gemma3_fast: q must be 3-D [tokens, q_heads, head_dim] or 4-D "
              "[batch, tokens, q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == q.dim(), "gemma3_fast: k must have as many dims as q (", q.dim(), "), got shape ", k.sizes());
  const int64_t t = q.size(-3), d = q.size(-1);
  TORCH_CHECK(d % 2 == 0 && d > 0, "gemma3_fast: head_dim must be even and > 0, got ", d);
  TORCH_CHECK(k.size(-3) == t && k.size(-1) == d && (q.dim() == 3 || k.size(0) == q.size(0)),
              "gemma3_fast: k has shape ", k.sizes(), " but q has ", q.sizes(), " (batch, tokens and head_dim must match)");
  check_same_dtype(k, q, "k", "q");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1, "gemma3_fast: q and k must be contiguous in head_dim");
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
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps) {
  check_qk_args(q, k, q_weight, k_weight, cos, sin, eps);
  const HeadRows qr(q), kr(k);
  const int64_t d = qr.d;
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
    const T *qw = q_weight.data_ptr<T>(), *kw = k_weight.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    T *qo = q_out.data_ptr<T>(), *ko = k_out.data_ptr<T>();
    const int64_t nq = qr.rows();
    at::parallel_for(0, nq + kr.rows(), 16, [&](int64_t b, int64_t e) {
      std::vector<float> buf(d);
      for (int64_t item = b; item < e; ++item) {
        const bool is_q = item < nq;
        const HeadRows& rows = is_q ? qr : kr;
        const int64_t row = is_q ? item : item - nq, ti = rows.token(row);
        norm_rope_row((is_q ? qo : ko) + row * d, (is_q ? qp : kp) + rows.offset(row), is_q ? qw : kw,
                      cp + ti * (d / 2), sp + ti * (d / 2), d, eps, buf.data());
      }
    });
  });
  return {q_out, k_out};
}

// Backward of one row: undo the rotation (the transpose of RoPE's), then RMSNorm's backward (norm_rows.h).
//   rope: o1 = n1 c - n2 s, o2 = n2 c + n1 s  =>  dn1 = g1 c + g2 s, dn2 = g2 c - g1 s
template <typename T>
void norm_rope_backward_row(T* dx, const T* g, const T* x, const T* w, const float* cos, const float* sin,
                            float* dw_acc, int64_t d, double eps, float* dn, float* gw) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float g1 = vec::to_f32(g[i]), g2 = vec::to_f32(g[i + half]);
    dn[i] = g1 * cos[i] + g2 * sin[i];
    dn[i + half] = g2 * cos[i] - g1 * sin[i];
  }
  norm_backward_row(dx, dn, x, w, dw_acc, d, eps, gw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin, double eps) {
  check_qk_args(q, k, q_weight, k_weight, cos, sin, eps);
  for (const auto& [g, x, name] : {std::tuple{&grad_q, &q, "grad_q"}, std::tuple{&grad_k, &k, "grad_k"}}) {
    TORCH_CHECK(g->sizes() == x->sizes(), "gemma3_fast: ", name, " has shape ", g->sizes(), ", expected ", x->sizes());
    check_same_dtype(*g, *x, name, "q");
  }
  const at::Tensor gq = grad_q.contiguous(), gk = grad_k.contiguous();
  const HeadRows qr(q), kr(k);
  const int64_t d = qr.d, nq = qr.rows();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  WeightGrads dw(d, 2);  // 0: q_weight, 1: k_weight
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *gqp = gq.data_ptr<T>(), *gkp = gk.data_ptr<T>();
    const T *qw = q_weight.data_ptr<T>(), *kw = k_weight.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>();
    at::parallel_for(0, nq + kr.rows(), 16, [&](int64_t b, int64_t e) {
      std::vector<float> dn(d), gw(d);
      for (int64_t item = b; item < e; ++item) {
        const bool is_q = item < nq;
        const HeadRows& rows = is_q ? qr : kr;
        const int64_t row = is_q ? item : item - nq, ti = rows.token(row);
        norm_rope_backward_row((is_q ? dqp : dkp) + row * d, (is_q ? gqp : gkp) + row * d,
                               (is_q ? qp : kp) + rows.offset(row), is_q ? qw : kw, cp + ti * (d / 2),
                               sp + ti * (d / 2), dw.of(is_q ? 0 : 1, 2), d, eps, dn.data(), gw.data());
      }
    });
  });
  return {dq, dk, dw.sum(0, 2, q_weight), dw.sum(1, 2, k_weight)};
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

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) {
  m.impl("qk_norm_rope", &qk_norm_rope_cpu);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_cpu);
}

}  // namespace gemma3_fast
