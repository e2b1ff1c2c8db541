// Softmax cross-entropy over the output head's logits, in place. The logits come transposed, [vocab, tokens]
// (W @ H^T: on a 2-core EPYC that GEMM and the two gradient GEMMs that read its result run at 150-190 GFLOP/s
// with 256 tokens, against 100-165 for the [tokens, vocab] orientation; the head is most of a 270M training
// step). Each column becomes its token's gradient (softmax - one_hot(target)) * grad_scale, and the column's
// loss lse - logit[target] is returned. Columns whose target is ignore_index get loss 0 and a zero gradient.
//
// Columns are contiguous within a vocabulary row, so the math runs 8 (AVX2; NEON: 4) columns at a time. Each
// thread takes a band of columns and visits the vocabulary in tiles that stay in L2: pass 1 reads a tile once from memory,
// takes its max and replaces it by exp(x - running max) while it is cached; pass 2 rescales each tile by
// exp(that tile's max - final max) / sum * grad_scale. The matrix is read twice and written twice, one exp per
// element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

constexpr int64_t kTile = 512;  // vocabulary rows per tile: 512 x 128 columns x 4 B = 256 KB

// x[c] = exp(x[c] - m[c]) for c in [0, n); returns nothing: sums are taken by the caller's add_to.
inline void exp_minus(float* x, const float* m, int64_t n) {
  int64_t c = 0;
#ifdef GEMMA3_SIMD
  for (; c + vec::kW <= n; c += vec::kW) vec::vstore(x + c, vec::vexp(vec::vsub(vec::vload(x + c), vec::vload(m + c))));
#endif
  for (; c < n; ++c) x[c] = std::exp(x[c] - m[c]);
}

}  // namespace

at::Tensor softmax_cross_entropy_cpu(at::Tensor& logits_t, const at::Tensor& targets, double grad_scale,
                                     int64_t ignore_index) {
  TORCH_CHECK(logits_t.scalar_type() == at::kFloat, "gemma3_fast: logits_t must be float32, got ",
              logits_t.scalar_type());
  check_dim(logits_t, 2, "logits_t", "[vocab, tokens]");
  check_contiguous(logits_t, "logits_t");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "gemma3_fast: targets must be int64, got ", targets.scalar_type());
  const int64_t vocab = logits_t.size(0), n = logits_t.size(1);
  check_shape(targets, {n}, "targets");
  check_contiguous(targets, "targets");
  TORCH_CHECK(vocab > 0, "gemma3_fast: logits_t must have a non-empty vocabulary dimension");
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < vocab), "gemma3_fast: targets[", r, "] = ", tp[r],
                " is outside the vocabulary [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  at::Tensor losses = at::empty({n}, logits_t.options());
  float *xp = logits_t.data_ptr<float>(), *out = losses.data_ptr<float>();
  const float gs = static_cast<float>(grad_scale);
  const int64_t tiles = (vocab + kTile - 1) / kTile;
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 7) / 8));
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t band = b0; band < b1; ++band) {
      // Columns [c0, c1): a multiple of 8 wide except the last band.
      const int64_t per = ((n + bands - 1) / bands + 7) / 8 * 8, c0 = std::min(n, band * per),
                    c1 = std::min(n, c0 + per), w = c1 - c0;
      if (w <= 0) continue;
      std::vector<float> m(w, -std::numeric_limits<float>::infinity()), s(w, 0.f), tile_max(tiles * w), target(w);
      for (int64_t c = 0; c < w; ++c) target[c] = tp[c0 + c] == ignore_index ? 0.f : xp[tp[c0 + c] * n + c0 + c];
      for (int64_t t = 0; t < tiles; ++t) {  // pass 1
        const int64_t v0 = t * kTile, v1 = std::min(vocab, v0 + kTile);
        float* mt = tile_max.data() + t * w;
        std::copy(m.begin(), m.end(), mt);
        for (int64_t v = v0; v < v1; ++v) {
          const float* row = xp + v * n + c0;
          int64_t c = 0;
#ifdef GEMMA3_SIMD
          for (; c + vec::kW <= w; c += vec::kW) vec::vstore(mt + c, vec::vmax(vec::vload(mt + c), vec::vload(row + c)));
#endif
          for (; c < w; ++c) mt[c] = std::max(mt[c], row[c]);
        }
        for (int64_t c = 0; c < w; ++c) {  // rescale the running sums to the new max
          if (mt[c] != m[c]) s[c] *= std::exp(m[c] - mt[c]);
          m[c] = mt[c];
        }
        for (int64_t v = v0; v < v1; ++v) {
          float* row = xp + v * n + c0;
          exp_minus(row, mt, w);
          vec::add(s.data(), s.data(), row, w);
        }
      }
      std::vector<float> factor(w);
      for (int64_t c = 0; c < w; ++c) {
        const bool ignored = tp[c0 + c] == ignore_index;
        out[c0 + c] = ignored ? 0.f : m[c] + std::log(s[c]) - target[c];
      }
      for (int64_t t = 0; t < tiles; ++t) {  // pass 2
        const int64_t v0 = t * kTile, v1 = std::min(vocab, v0 + kTile);
        const float* mt = tile_max.data() + t * w;
        for (int64_t c = 0; c < w; ++c)
          factor[c] = tp[c0 + c] == ignore_index ? 0.f : std::exp(mt[c] - m[c]) * gs / s[c];
        for (int64_t v = v0; v < v1; ++v) {
          float* row = xp + v * n + c0;
          int64_t c = 0;
#ifdef GEMMA3_SIMD
          for (; c + vec::kW <= w; c += vec::kW) vec::vstore(row + c, vec::vmul(vec::vload(row + c), vec::vload(factor.data() + c)));
#endif
          for (; c < w; ++c) row[c] *= factor[c];
        }
      }
      for (int64_t c = 0; c < w; ++c)
        if (tp[c0 + c] != ignore_index) xp[tp[c0 + c] * n + c0 + c] -= gs;
    }
  });
  return losses;
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("softmax_cross_entropy_", &softmax_cross_entropy_cpu); }

}  // namespace gemma3_fast
