// Backward of causal_attention (training; every batch row a sequence from position 0), flash-style: nothing of
// size [tokens, tokens] is kept from the forward. The probabilities are rebuilt block by block from the saved
// log-sum-exp rows, P = exp(scale q.k - lse), and with D_i = sum(dO_i * O_i):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,  dK = scale dS^T Q.
// Work item: one block of keys of one (batch row, KV head), with every query (of the G heads that share the KV
// head) that sees it; so dK and dV rows have one writer. dQ rows collect from several key blocks: each of a
// fixed set of slots (one per thread) sums into its own fp32 copy, added up at the end in slot order. Scores and
// products are GEMMs (at::mm, one thread each).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

constexpr int64_t kQueryBlock = 32, kKeyBlock = 64;

template <typename T>
void causal_attention_backward_kernel(const T* gout, const T* q, const T* k, const T* v, const T* out,
                                      const float* lse, T* dq, T* dk, T* dv, int64_t t, int64_t hq, int64_t hk,
                                      int64_t d, int64_t window, float scale) {
  auto blob = [](float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); };
  const int64_t g = hq / hk, nrows = t * g;  // query row r = (token r / g, head gi * g + r % g)
  const int64_t threads = at::get_num_threads();
  for (int64_t gi = 0; gi < hk; ++gi) {
    // This KV head's operands in fp32: Q (scaled), dO, per-row lse and D; K and V.
    std::vector<float> qs(nrows * d), go(nrows * d), lr(nrows), dr(nrows), keys(t * d), vals(t * d);
    at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
      for (int64_t ti = b; ti < e; ++ti) {
        vec::convert(keys.data() + ti * d, k + (ti * hk + gi) * d, d);
        vec::convert(vals.data() + ti * d, v + (ti * hk + gi) * d, d);
        for (int64_t h = 0; h < g; ++h) {
          const int64_t r = ti * g + h, src = (ti * hq + gi * g + h) * d;
          for (int64_t x = 0; x < d; ++x) qs[r * d + x] = vec::to_f32(q[src + x]) * scale;
          vec::convert(go.data() + r * d, gout + src, d);
          dr[r] = vec::dot(gout + src, out + src, d);
          lr[r] = lse[ti * hq + gi * g + h];
        }
      }
    });
    // Key block kb goes to slot kb % slots, each slot summing its dQ in its own copy: a fixed assignment (not a
    // shared counter), so the order of every sum, and so the gradients, are the same from run to run.
    const int64_t nkb = (t + kKeyBlock - 1) / kKeyBlock, slots = std::min(threads, nkb);
    std::vector<float> dq_acc(slots * nrows * d, 0.f);
    at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
      const int64_t rows_max = kQueryBlock * g;
      std::vector<float> p(rows_max * kKeyBlock), dp(rows_max * kKeyBlock), dkb(kKeyBlock * d), dvb(kKeyBlock * d);
      for (int64_t item = 0; item < (s1 - s0) * nkb; ++item) {  // this chunk's slots, each slot's key blocks
        const int64_t slot = s0 + item / nkb, kb = slot + (item % nkb) * slots;
        if (kb >= nkb) continue;
        float* dq_mine = dq_acc.data() + slot * nrows * d;
        const int64_t j0 = kb * kKeyBlock, nb = std::min(kKeyBlock, t - j0), j_last = j0 + nb - 1;
        const int64_t i_end = window > 0 ? std::min(t, j_last + window) : t;  // queries j0 .. i_end - 1 see a key
        std::fill(dkb.begin(), dkb.begin() + nb * d, 0.f);
        std::fill(dvb.begin(), dvb.begin() + nb * d, 0.f);
        const at::Tensor kblk = blob(keys.data() + j0 * d, nb, d), vblk = blob(vals.data() + j0 * d, nb, d);
        at::Tensor dk_t = blob(dkb.data(), nb, d), dv_t = blob(dvb.data(), nb, d);
        for (int64_t t0 = (j0 / kQueryBlock) * kQueryBlock; t0 < i_end; t0 += kQueryBlock) {
          const int64_t t1 = std::min(i_end, t0 + kQueryBlock), rows = (t1 - t0) * g;
          const at::Tensor qblk = blob(qs.data() + t0 * g * d, rows, d), goblk = blob(go.data() + t0 * g * d, rows, d);
          at::Tensor pt = blob(p.data(), rows, nb), dpt = blob(dp.data(), rows, nb);
          at::mm_out(pt, qblk, kblk.t());    // scale q.k
          at::mm_out(dpt, goblk, vblk.t());  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = t0 + r / g;
            float *pr = p.data() + r * nb, *dpr = dp.data() + r * nb;
            vec::exp_shift_sum(pr, lr[t0 * g + r], nb);  // P, from the forward's log-sum-exp
            for (int64_t c = 0; c < nb; ++c) {
              const int64_t j = j0 + c;
              if (j > i || (window > 0 && i - j >= window)) pr[c] = 0.f;
              dpr[c] = pr[c] * (dpr[c] - dr[t0 * g + r]);  // dS
            }
          }
          dv_t.addmm_(pt.t(), goblk);                                     // dV += P^T dO
          dk_t.addmm_(dpt.t(), qblk);                                     // dK += dS^T (scale Q)
          blob(dq_mine + t0 * g * d, rows, d).addmm_(dpt, kblk);          // dQ += dS K (scaled below)
        }
        for (int64_t c = 0; c < nb; ++c) {
          vec::convert(dk + ((j0 + c) * hk + gi) * d, dkb.data() + c * d, d);
          vec::convert(dv + ((j0 + c) * hk + gi) * d, dvb.data() + c * d, d);
        }
      }
    });
    at::parallel_for(0, nrows, 16, [&](int64_t b, int64_t e) {
      std::vector<float> row(d);
      for (int64_t r = b; r < e; ++r) {
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t sl = 0; sl < slots; ++sl) vec::axpy(row.data(), scale, dq_acc.data() + (sl * nrows + r) * d, d);
        vec::convert(dq + ((r / g) * hq + gi * g + r % g) * d, row.data(), d);
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t window, double scale) {
  check_causal_attention_args(q, k, v, window);
  const int64_t b = q.size(0), t = q.size(1), hq = q.size(2), hk = k.size(2), d = q.size(3);
  for (const auto& [x, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(x->sizes() == q.sizes(), "gemma3_fast: ", name, " has shape ", x->sizes(), ", expected q's ",
                q.sizes());
    check_same_dtype(*x, q, name, "q");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "gemma3_fast: lse must be float32, got ", lse.scalar_type());
  check_shape(lse, {b, t, hq}, "lse");
  check_contiguous(lse, "lse");
  check_contiguous(out, "out");
  const at::Tensor go = grad_out.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t oq = i * t * hq * d, ok = i * t * hk * d;
      causal_attention_backward_kernel<T>(go.data_ptr<T>() + oq, q.data_ptr<T>() + oq, k.data_ptr<T>() + ok,
                                          v.data_ptr<T>() + ok, out.data_ptr<T>() + oq,
                                          lse.data_ptr<float>() + i * t * hq, dq.data_ptr<T>() + oq,
                                          dk.data_ptr<T>() + ok, dv.data_ptr<T>() + ok, t, hq, hk, d, window,
                                          static_cast<float>(scale));
    }
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("causal_attention_backward", &causal_attention_backward_cpu); }

}  // namespace gemma3_fast
