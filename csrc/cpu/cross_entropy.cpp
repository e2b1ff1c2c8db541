// Softmax cross-entropy of logit rows, in place: each row of fp32 logits becomes its gradient
// (softmax - one_hot(target)) * grad_scale, and the row's loss lse - logit[target] is returned. Rows whose target
// is ignore_index get loss 0 and a zero gradient. The training loss computes the output head in chunks of rows
// and runs this on each chunk, so the [tokens, vocab] logits never exist at once; a vocabulary row (1 MB for
// 262144 entries) is read twice and written once, from L2, instead of the five passes over memory that
// max / sub / exp / sum / div take as separate torch ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {

at::Tensor softmax_cross_entropy_cpu(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                                     int64_t ignore_index) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "gemma3_fast: logits must be float32, got ", logits.scalar_type());
  check_dim(logits, 2, "logits", "[rows, vocab]");
  check_contiguous(logits, "logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "gemma3_fast: targets must be int64, got ", targets.scalar_type());
  check_shape(targets, {logits.size(0)}, "targets");
  check_contiguous(targets, "targets");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "gemma3_fast: logits must have a non-empty vocabulary dimension");
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < vocab), "gemma3_fast: targets[", r, "] = ", tp[r],
                " is outside the vocabulary [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  at::Tensor losses = at::empty({rows}, logits.options());
  float *lp = logits.data_ptr<float>(), *out = losses.data_ptr<float>();
  const float gs = static_cast<float>(grad_scale);
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* x = lp + r * vocab;
      if (tp[r] == ignore_index) {
        std::fill(x, x + vocab, 0.f);
        out[r] = 0.f;
        continue;
      }
      const float target_logit = x[tp[r]];
      const float mx = vec::max_value(x, vocab, -std::numeric_limits<float>::infinity());
      const float sum = vec::exp_shift_sum(x, mx, vocab);  // x = exp(x - max)
      out[r] = mx + std::log(sum) - target_logit;
      vec::scale(x, gs / sum, vocab);
      x[tp[r]] -= gs;
    }
  });
  return losses;
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("softmax_cross_entropy_", &softmax_cross_entropy_cpu); }

}  // namespace gemma3_fast
