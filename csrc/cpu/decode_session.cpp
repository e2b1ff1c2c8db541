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
  num_layers_ = static_cast<int64_t>(windows_.size());
  TORCH_CHECK(num_layers_ > 0 && !k_caches_.empty() && k_caches_.size() % windows_.size() == 0 &&
                  v_caches_.size() == k_caches_.size(),
              "gemma3_fast: DecodeSession takes one k_cache and one v_cache per slot and layer (", num_layers_,
              " layers, the length of windows), got ", k_caches_.size(), " and ", v_caches_.size());
  num_slots_ = static_cast<int64_t>(k_caches_.size()) / num_layers_;
  ids_ = at::zeros({1}, at::kLong);
  positions_ = at::zeros({1}, at::kLong);
}

void DecodeSession::check_slot(int64_t slot, const char* what) const {
  TORCH_CHECK(slot >= 0 && slot < num_slots_, "gemma3_fast: DecodeSession: ", what, " ", slot, " is not a slot: ",
              "the session holds ", num_slots_);
}

at::Tensor DecodeSession::hidden(int64_t token, int64_t position, int64_t slot) {
  TORCH_CHECK(position >= 0, "gemma3_fast: DecodeSession: position must be >= 0, got ", position);
  check_slot(slot, "slot");
  ids_.data_ptr<int64_t>()[0] = token;  // range-checked by decoder_hidden
  positions_.data_ptr<int64_t>()[0] = position;
  const auto layers = [&](const std::vector<at::Tensor>& caches) {
    return at::TensorList(caches).slice(slot * num_layers_, num_layers_);
  };
  return decoder_hidden_cpu(ids_, positions_, embed_weight_, head_scales_, embed_scale_, first_norm_,
                            inv_freq_local_, inv_freq_global_, layers(k_caches_), layers(v_caches_), weights_,
                            scales_, norms_, windows_, ring_, num_heads_, scale_, eps_, /*write_cache=*/true,
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

at::Tensor DecodeSession::logits(int64_t token, int64_t position, int64_t slot) {
  c10::InferenceMode no_autograd;  // as the Python decode path runs (torch.inference_mode)
  const at::Tensor y = hidden(token, position, slot);
  return head([&] { return linear_cpu(y, head_weight_, head_scales_); });
}

int64_t DecodeSession::greedy(int64_t token, int64_t position, int64_t slot) {
  c10::InferenceMode no_autograd;
  const at::Tensor y = hidden(token, position, slot);
  return head([&] { return linear_argmax_cpu(y, head_weight_, head_scales_); });
}

at::Tensor DecodeSession::logits_batch(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                                       const std::vector<int64_t>& slots) {
  c10::InferenceMode no_autograd;
  const size_t b = tokens.size();
  TORCH_CHECK(b > 0 && positions.size() == b && slots.size() == b, "gemma3_fast: DecodeSession.logits_batch takes ",
              "as many positions and slots as tokens (at least one), got ", b, " tokens, ", positions.size(),
              " positions, ", slots.size(), " slots");
  std::vector<at::Tensor> k, v;
  k.reserve(b * num_layers_);
  v.reserve(b * num_layers_);
  std::vector<bool> taken(num_slots_, false);
  for (size_t i = 0; i < b; ++i) {
    check_slot(slots[i], "slots[i]");
    TORCH_CHECK(!taken[slots[i]], "gemma3_fast: DecodeSession.logits_batch: slot ", slots[i], " appears twice: a ",
                "sequence steps once per batch");
    taken[slots[i]] = true;
    for (int64_t l = 0; l < num_layers_; ++l) {
      k.push_back(k_caches_[slots[i] * num_layers_ + l]);
      v.push_back(v_caches_[slots[i] * num_layers_ + l]);
    }
  }
  const at::Tensor ids = at::tensor(tokens, at::kLong), pos = at::tensor(positions, at::kLong);
  const at::Tensor y = decoder_hidden_batched_cpu(ids, pos, embed_weight_, head_scales_, embed_scale_,
                                                  first_norm_, inv_freq_local_, inv_freq_global_, k, v, weights_,
                                                  scales_, norms_, windows_, ring_, num_heads_, scale_, eps_);
  return batched_head_cpu(y, head_weight_, head_scales_);
}

}  // namespace gemma3_fast
