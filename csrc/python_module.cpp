// The Python module gemma3_fast._C. Importing it loads this library, which runs the op registrations (ops.cpp and
// the TORCH_LIBRARY_IMPL blocks). It also holds what is not an op: CUDA_BUILT, SIMD, OPENMP, DecodeSession (the
// decode step without the per-step cost of an op call from Python: see cpu/decode_session.h), its fused head
// argmax, and BpeTokenizer (the compact tokenizer: bpe_tokenizer.h).
#include <torch/extension.h>

#include "bpe_tokenizer.h"
#include "cpu/decode_session.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace {

// c10::Error's what() carries a C++ backtrace; Python users get the message alone, as from the ops.
template <typename F>
auto without_backtrace(F f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using gemma3_fast::DecodeSession;
  m.doc() = "gemma3_fast compiled operators";
#ifdef GEMMA3_WITH_CUDA
  m.attr("CUDA_BUILT") = 1;
#else
  m.attr("CUDA_BUILT") = 0;
#endif
  // Which vector paths this build compiled (the -march it was built for, not the CPU it runs on), and whether
  // it has OpenMP (without it, at::parallel_for runs every kernel on one thread).
#if defined(__AVX512F__)
  m.attr("SIMD") = "avx512";
#elif defined(GEMMA3_AVX2)
  m.attr("SIMD") = "avx2";
#elif defined(GEMMA3_NEON)
  m.attr("SIMD") = "neon";
#else
  m.attr("SIMD") = "scalar";
#endif
#ifdef _OPENMP
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
  pybind11::class_<DecodeSession>(m, "DecodeSession",
                                  "decoder_forward's arguments for one model and its KV caches (one or more slots), bound once "
                                  "(CPU only)")
      .def(pybind11::init([](at::Tensor embed_weight, double embed_scale, at::Tensor first_norm,
                             at::Tensor inv_freq_local, at::Tensor inv_freq_global, std::vector<at::Tensor> k_caches,
                             std::vector<at::Tensor> v_caches, std::vector<at::Tensor> weights,
                             std::vector<std::optional<at::Tensor>> scales, std::vector<at::Tensor> norms,
                             std::vector<int64_t> windows, std::vector<bool> ring, at::Tensor head_weight,
                             std::optional<at::Tensor> head_scales, int64_t num_heads, double scale, double eps) {
             return without_backtrace([&] {
               return std::make_unique<DecodeSession>(embed_weight, embed_scale, first_norm, inv_freq_local,
                                                      inv_freq_global, k_caches, v_caches, weights, scales, norms,
                                                      windows, ring, head_weight, head_scales, num_heads, scale,
                                                      eps);
             });
           }),
           pybind11::arg("embed_weight"), pybind11::arg("embed_scale"), pybind11::arg("first_norm"),
           pybind11::arg("inv_freq_local"), pybind11::arg("inv_freq_global"), pybind11::arg("k_caches"),
           pybind11::arg("v_caches"), pybind11::arg("weights"), pybind11::arg("scales"), pybind11::arg("norms"),
           pybind11::arg("windows"), pybind11::arg("ring"), pybind11::arg("head_weight"),
           pybind11::arg("head_scales"), pybind11::arg("num_heads"), pybind11::arg("scale"), pybind11::arg("eps"))
      .def(
          "logits",
          [](DecodeSession& s, int64_t token, int64_t position, int64_t slot) {
            return without_backtrace([&] { return s.logits(token, position, slot); });
          },
          pybind11::arg("token"), pybind11::arg("position"), pybind11::arg("slot") = 0,
          pybind11::call_guard<pybind11::gil_scoped_release>(),
          "logits [1, vocab] of one decode step (token at position), its key and value written to slot's caches")
      .def(
          "greedy",
          [](DecodeSession& s, int64_t token, int64_t position, int64_t slot) {
            return without_backtrace([&] { return s.greedy(token, position, slot); });
          },
          pybind11::arg("token"), pybind11::arg("position"), pybind11::arg("slot") = 0,
          pybind11::call_guard<pybind11::gil_scoped_release>(),
          "one decode step, then the argmax of its logits: the next token of greedy decoding")
      .def(
          "logits_batch",
          [](DecodeSession& s, const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
             const std::vector<int64_t>& slots) {
            return without_backtrace([&] { return s.logits_batch(tokens, positions, slots); });
          },
          pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("slots"),
          pybind11::call_guard<pybind11::gil_scoped_release>(),
          "one decode step of several sequences (tokens[b] at positions[b] in slot slots[b]): logits [B, vocab], "
          "each row the one a step of that sequence alone gives")
      .def_property_readonly("num_slots", &DecodeSession::num_slots);
  m.def(
      "linear_argmax",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
        return without_backtrace([&] { return gemma3_fast::linear_argmax_cpu(x, weight, scales); });
      },
      pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scales") = pybind11::none(),
      "argmax(linear(x, weight, scales)) of one token, found while the output is written (DecodeSession.greedy's "
      "head; exposed for its tests)");
  m.def("gemv_token_limit", &gemma3_fast::gemv_token_limit, pybind11::arg("weight"),
        "the most tokens linear runs through the decode kernel (one pass over the weight, each token's outputs "
        "its batch-1 ones) for this weight; more go to a matmul");
  m.def("set_gguf_int16_activations", &gemma3_fast::set_gguf_int16_activations, pybind11::arg("on"),
        "GGUF block weights' decode kernels with activations quantized to int16 (fast, approximate) or fp32 (exact, "
        "the default); process-wide");
  m.def("gguf_int16_activations", &gemma3_fast::gguf_int16_activations);
  m.attr("GGUF_INT16_ACTIVATIONS") = gemma3_fast::gguf_int16_available();

  using gemma3_fast::BpeTokenizer;
  pybind11::class_<BpeTokenizer>(m, "BpeTokenizer",
                                 "Gemma's tokenizer.json (SentencePiece-style BPE with byte fallback) in ~14 MB of "
                                 "tables: encode/decode as the `tokenizers` library does (gemma3_fast/tokenizer.py)")
      .def(pybind11::init([](const at::Tensor& blob, const at::Tensor& offsets, const at::Tensor& merges,
                             const at::Tensor& added_ids, const at::Tensor& added_flags, int64_t unk_id,
                             bool fuse_unk, bool byte_fallback) {
             return without_backtrace([&] {
               return std::make_unique<BpeTokenizer>(blob, offsets, merges, added_ids, added_flags, unk_id,
                                                     fuse_unk, byte_fallback);
             });
           }),
           pybind11::arg("blob"), pybind11::arg("offsets"), pybind11::arg("merges"), pybind11::arg("added_ids"),
           pybind11::arg("added_flags"), pybind11::arg("unk_id"), pybind11::arg("fuse_unk"),
           pybind11::arg("byte_fallback"))
      .def_static(
          "load",
          [](const std::string& path) { return without_backtrace([&] { return BpeTokenizer::load(path); }); },
          pybind11::arg("path"), "the tables save() wrote, mapped read-only")
      .def(
          "save",
          [](const BpeTokenizer& t, const std::string& path) { without_backtrace([&] { t.save(path); }); },
          pybind11::arg("path"))
      .def("encode", &BpeTokenizer::encode, pybind11::arg("text"), pybind11::call_guard<pybind11::gil_scoped_release>(),
           "token ids of text (no <bos> added)")
      .def("decode", &BpeTokenizer::decode, pybind11::arg("ids"), pybind11::arg("skip_special_tokens") = true,
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("token_to_id", [](const BpeTokenizer& t, const std::string& token) -> std::optional<int64_t> {
             const int64_t id = t.token_to_id(token);
             return id < 0 ? std::nullopt : std::optional<int64_t>(id);
           })
      .def("id_to_token", [](const BpeTokenizer& t, int64_t id) -> std::optional<std::string> {
             if (id < 0 || id >= t.size()) return std::nullopt;
             return t.id_to_token(id);
           })
      .def_property_readonly("vocab_size", &BpeTokenizer::size)
      .def_property_readonly("memory_bytes", &BpeTokenizer::memory_bytes)
      .def_property_readonly("mapped", &BpeTokenizer::mapped);
  m.attr("BpeTokenizer").attr("FILE_VERSION") = BpeTokenizer::kFileVersion;
}
