// A decode session: decoder_forward's arguments for one model and one KV cache, bound once, and a decode step
// that takes a token id and a position as plain integers.
//
// Going through the op, a decode step paid ~0.6-0.7 ms outside the kernels (2-core EPYC, bf16, measured
// with timestamps on both sides of the call): the checks that the model's weights are still the same objects,
// a positions tensor, parsing ~330 tensors of Python lists into the op's arguments, the return to Python, the
// argmax op. Each is a few microseconds in a warm loop but many times that here, because the weights streaming
// past between two steps evict the interpreter's and the dispatcher's code and data.
// The session does the same work as the op (it calls the same CPU kernel) with none of that per step.
//
// A session may hold several sequences' caches (slots): k_caches is then slot-major, slot s's layer i at
// s * layers + i. A step of one slot is decoder_forward; a step of several (the server's batch) is
// decoder_forward_batched, each weight read once for all of them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace gemma3_fast {

class DecodeSession {
 public:
  // The arguments of decoder_forward that stay the same from step to step (see its schema in ops.cpp).
  DecodeSession(at::Tensor embed_weight, double embed_scale, at::Tensor first_norm, at::Tensor inv_freq_local,
                at::Tensor inv_freq_global, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                std::vector<at::Tensor> weights, std::vector<std::optional<at::Tensor>> scales,
                std::vector<at::Tensor> norms, std::vector<int64_t> windows, std::vector<bool> ring,
                at::Tensor head_weight, std::optional<at::Tensor> head_scales, int64_t num_heads, double scale,
                double eps);

  // decoder_forward of one token at `position`, writing its key and value to slot's caches: logits [1, vocab].
  at::Tensor logits(int64_t token, int64_t position, int64_t slot = 0);
  // The same step and the argmax of its logits (greedy decoding's next token), found while the head writes them.
  int64_t greedy(int64_t token, int64_t position, int64_t slot = 0);
  // decoder_forward_batched: tokens[b] at positions[b] in slot slots[b] (distinct slots): logits [B, vocab].
  at::Tensor logits_batch(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                          const std::vector<int64_t>& slots);
  int64_t num_slots() const { return num_slots_; }

 private:
  at::Tensor hidden(int64_t token, int64_t position, int64_t slot);  // the step up to the head: [1, hidden]
  void check_slot(int64_t slot, const char* what) const;
  template <typename F>
  auto head(const F& f);

  at::Tensor embed_weight_, first_norm_, inv_freq_local_, inv_freq_global_, head_weight_;
  std::optional<at::Tensor> head_scales_;
  std::vector<at::Tensor> k_caches_, v_caches_, weights_, norms_;
  c10::List<std::optional<at::Tensor>> scales_;
  std::vector<int64_t> windows_;
  c10::List<bool> ring_;
  int64_t num_heads_, num_layers_, num_slots_;
  double embed_scale_, scale_, eps_;
  at::Tensor ids_, positions_;  // [1] int64 each, rewritten every step
};

}  // namespace gemma3_fast
