// The gated MLP's activation, gelu_tanh(gate) * up, on the fused gate|up projection output, and its backward.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

constexpr int64_t kChunk = 512;  // elements per task: a decode row splits across both cores only when long

void check_gate_up(const at::Tensor& gate_up, const char* name) {
  check_float_tensor(gate_up, name);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0 && gate_up.size(-1) > 0, "gemma3_fast: ", name,
              " must end in an even, non-empty dimension (gate | up), got shape ", gate_up.sizes());
}

// Runs f(row, i0, n) over every row of [rows, inter] in chunks of kChunk.
template <typename F>
void for_chunks(int64_t rows, int64_t inter, const F& f) {
  const int64_t chunks = (inter + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * chunks, rows * chunks >= 8 ? 1 : rows * chunks, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t row = task / chunks, i0 = (task % chunks) * kChunk;
      f(row, i0, std::min(kChunk, inter - i0));
    }
  });
}

// d gate = g u gelu'(x), d up = g gelu(x) with gelu(x) = 0.5 x (1 + t), t = tanh(c (x + a x^3)),
// gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2). tanh(z) = 1 - 2 / (1 + e^(2z)).
template <typename T>
void gelu_tanh_mul_backward_row(T* dgate, T* dup, const T* grad, const T* gate, const T* up, int64_t n) {
  constexpr float kC = 0.7978845608028654f, kA = 0.044715f;
  int64_t i = 0;
#ifdef GEMMA3_SIMD
  using namespace vec;
  const vf c = vset(kC), a = vset(kA), a3 = vset(3.f * kA), one = vset(1.f), two = vset(2.f), half = vset(0.5f);
  for (; i + kW <= n; i += kW) {
    const vf x = vload(gate + i), u = vload(up + i), g = vload(grad + i);
    const vf x2 = vmul(x, x);
    const vf z = vmul(c, vfma(vmul(a, x), x2, x));
    const vf t = vsub(one, vdiv(two, vadd(one, vexp(vadd(z, z)))));
    const vf gelu = vmul(vmul(half, x), vadd(one, t));
    const vf dz = vmul(c, vfma(a3, x2, one));
    const vf sech2 = vfnma(t, t, one);
    const vf dgelu = vfma(vmul(vmul(half, x), sech2), dz, vmul(half, vadd(one, t)));
    vstore(dgate + i, vmul(vmul(g, u), dgelu));
    vstore(dup + i, vmul(g, gelu));
  }
#endif
  for (; i < n; ++i) {
    const float x = vec::to_f32(gate[i]), u = vec::to_f32(up[i]), g = vec::to_f32(grad[i]);
    const float t = std::tanh(kC * (x + kA * x * x * x));
    const float dgelu = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kC * (1.f + 3.f * kA * x * x);
    dgate[i] = vec::from_f32<T>(g * u * dgelu);
    dup[i] = vec::from_f32<T>(g * 0.5f * x * (1.f + t));
  }
}

}  // namespace

at::Tensor gelu_tanh_mul_cpu(const at::Tensor& gate_up) {
  check_gate_up(gate_up, "gate_up");
  const at::Tensor in = gate_up.contiguous();
  const int64_t inter = in.size(-1) / 2, rows = in.numel() / (2 * inter);
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  shape.back() = inter;
  at::Tensor act = at::empty(shape, in.options());
  dispatch_float_bf16(in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = in.data_ptr<T>();
    T* op = act.data_ptr<T>();
    for_chunks(rows, inter, [&](int64_t row, int64_t i0, int64_t n) {
      const T* r = ip + row * 2 * inter;
      vec::gelu_tanh_mul(op + row * inter + i0, r + i0, r + inter + i0, n);
    });
  });
  return act;
}

at::Tensor gelu_tanh_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_gate_up(gate_up, "gate_up");
  const at::Tensor in = gate_up.contiguous();
  const int64_t inter = in.size(-1) / 2, rows = in.numel() / (2 * inter);
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  shape.back() = inter;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "gemma3_fast: grad has shape ", grad.sizes(), ", expected ",
              at::IntArrayRef(shape), " (gate_up with its last dim halved)");
  check_same_dtype(grad, in, "grad", "gate_up");
  const at::Tensor g = grad.contiguous();
  at::Tensor d = at::empty_like(in);
  dispatch_float_bf16(in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *ip = in.data_ptr<T>(), *gp = g.data_ptr<T>();
    T* dp = d.data_ptr<T>();
    for_chunks(rows, inter, [&](int64_t row, int64_t i0, int64_t n) {
      const T* r = ip + row * 2 * inter;
      T* dr = dp + row * 2 * inter;
      gelu_tanh_mul_backward_row(dr + i0, dr + inter + i0, gp + row * inter + i0, r + i0, r + inter + i0, n);
    });
  });
  return d;
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) {
  m.impl("gelu_tanh_mul", &gelu_tanh_mul_cpu);
  m.impl("gelu_tanh_mul_backward", &gelu_tanh_mul_backward_cpu);
}

}  // namespace gemma3_fast
