#include "decode_session.h"

#include <c10/core/InferenceMode.h>

#include "kernels.h"

namespace gemma3_fast {

DecodeSession::DecodeSession(at::Tensor embed_weight, double embed_scale, at::Tensor first_norm,
                             at::Tensor inv_freq_local, at::Tensor inv_freq_global, std::vector<at::Tensor> k_caches,
                             std::vector<at::Tensor> v_caches, std::vector<at::Tensor> weights,
                             std::vector<std::optional<at::Tensor>> scales, std::vector<at::Tensor> norms,
                             std::vector<int64_t> windows, std::vector<bool> ring, at::Tensor head_weight,
                             std::optional<at::Tensor> head_scales, int64_t num_heads, double scale, double eps)
    : embed_weight_(std::move(embed_weight)),
      first_norm_(std::move(first_norm)),
      inv_freq_local_(std::move(inv_freq_local)),
      inv_freq_global_(std::move(inv_freq_global)),
      head_weight_(std::move(head_weight)),
      head_scales_(std::move(head_scales)),
      k_caches_(std::move(k_caches)),
      v_caches_(std::move(v_caches)),
      weights_(std::move(weights)),
      norms_(std::move(norms)),
      windows_(std::move(windows)),
      num_heads_(num_heads),
      embed_scale_(embed_scale),
      scale_(scale),
      eps_(eps) {
  // The kernels check everything else at every step; only the device is the session's own business.
  auto on_cpu = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(!t.defined() || t.device().is_cpu(), "gemma3_fast: DecodeSession runs the CPU kernels, but ", name,
                " is on ", t.device());
  };
  for (const auto& [t, name] : {std::pair{&embed_weight_, "embed_weight"}, {&first_norm_, "first_norm"},
                                {&inv_freq_local_, "inv_freq_local"}, {&inv_freq_global_, "inv_freq_global"},
                                {&head_weight_, "head_weight"}})
    on_cpu(*t, name);
  for (const auto* list : {&k_caches_, &v_caches_, &weights_, &norms_})
    for (const at::Tensor& t : *list) on_cpu(t, "a cache, weight or norm");
  for (const auto& s : scales) {
    if (s.has_value()) on_cpu(*s, "an int8 scale");
    scales_.push_back(s);
  }
  if (head_scales_.has_value()) on_cpu(*head_scales_, "head_scales");
  for (const bool r : ring) ring_.push_back(r);
  ids_ = at::zeros({1}, at::kLong);
  positions_ = at::zeros({1}, at::kLong);
}

at::Tensor DecodeSession::hidden(int64_t token, int64_t position) {
  TORCH_CHECK(position >= 0, "gemma3_fast: DecodeSession: position must be >= 0, got ", position);
  ids_.data_ptr<int64_t>()[0] = token;  // range-checked by decoder_hidden
  positions_.data_ptr<int64_t>()[0] = position;
  return decoder_hidden_cpu(ids_, positions_, embed_weight_, embed_scale_, first_norm_, inv_freq_local_,
                            inv_freq_global_, k_caches_, v_caches_, weights_, scales_, norms_, windows_, ring_,
                            num_heads_, scale_, eps_, /*write_cache=*/true,
                            /*last_token_only=*/false);
}

// As decoder_forward_cpu's head.
template <typename F>
auto DecodeSession::head(const F& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "gemma3_fast: DecodeSession, the output head (head_weight, head_scales): ",
                e.what_without_backtrace());
  }
}

at::Tensor DecodeSession::logits(int64_t token, int64_t position) {
  c10::InferenceMode no_autograd;  // as the Python decode path runs (torch.inference_mode)
  const at::Tensor y = hidden(token, position);
  return head([&] { return linear_cpu(y, head_weight_, head_scales_); });
}

int64_t DecodeSession::greedy(int64_t token, int64_t position) {
  c10::InferenceMode no_autograd;
  const at::Tensor y = hidden(token, position);
  return head([&] { return linear_argmax_cpu(y, head_weight_, head_scales_); });
}

}  // namespace gemma3_fast
