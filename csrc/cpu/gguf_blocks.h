// GGUF (llama.cpp) block formats, as weights of the linear op: a uint8 tensor [rows, blocks, block_bytes], each
// row `blocks` whole blocks as the file stores them. block_bytes names the format (every supported one has its
// own size), so the tensor describes itself and flows through the same op schemas as fp32/bf16/int8 weights.
//
// decode_block is the reference decoding (bit-exact with gguf.quants.dequantize, which tests hold it to):
// weight i = scale[i / group] * q[i] - min[i / 32]. The linear kernels (gguf_linear.cpp) factor the scales out
// of each 32-weight dot product instead: the same sums up to fp32 rounding order.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace gemma3_fast {
namespace gguf {

// ggml's type ids (GGMLQuantizationType in the gguf package).
enum class Type : int { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Format {
  Type type;
  const char* name;
  int64_t block_elems;  // weights per block
  int64_t block_bytes;
};

constexpr Format kFormats[] = {
    {Type::Q4_0, "Q4_0", 32, 18},  {Type::Q5_0, "Q5_0", 32, 22},    {Type::Q8_0, "Q8_0", 32, 34},
    {Type::Q4_K, "Q4_K", 256, 144}, {Type::Q5_K, "Q5_K", 256, 176}, {Type::Q6_K, "Q6_K", 256, 210},
};

constexpr const Format& format_for(Type t) {
  for (const Format& f : kFormats)
    if (f.type == t) return f;
  return kFormats[0];  // not reached: every Type has a row above
}

inline bool is_block_weight(const at::Tensor& w) { return w.scalar_type() == at::kByte && w.dim() == 3; }

inline const Format* format_of(int64_t block_bytes) {
  for (const Format& f : kFormats)
    if (f.block_bytes == block_bytes) return &f;
  return nullptr;
}

// The format of a block weight, checked: 3-D uint8, contiguous, a known block size.
inline const Format& block_format(const at::Tensor& w, const char* name) {
  TORCH_CHECK(is_block_weight(w), "gemma3_fast: ", name, " is not a GGUF block weight (uint8 [rows, blocks, ",
              "block_bytes]), got ", w.scalar_type(), " of shape ", w.sizes());
  const Format* f = format_of(w.size(2));
  TORCH_CHECK(f != nullptr, "gemma3_fast: ", name, " has blocks of ", w.size(2), " bytes, which is no supported ",
              "GGUF format (Q4_0 18, Q5_0 22, Q8_0 34, Q4_K 144, Q5_K 176, Q6_K 210)");
  TORCH_CHECK(w.is_contiguous(), "gemma3_fast: ", name, " (GGUF blocks) must be contiguous");
  return *f;
}

// in_features of any weight the linear op takes: [out, in] tensors, or blocks * weights per block.
inline int64_t in_features(const at::Tensor& w) {
  if (w.dim() == 3 && w.scalar_type() == at::kByte) {
    const Format* f = format_of(w.size(2));
    return f ? w.size(1) * f->block_elems : -1;
  }
  return w.dim() == 2 ? w.size(1) : -1;
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block (its 12 packed scale bytes).
inline void k4_scale_min(int j, const uint8_t* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

struct Decoded {
  int8_t q[256];
  float scale[16];  // per `group` weights
  float min[8];     // per 32 weights (0 but for Q4_K/Q5_K)
  int group;
};

// One block b of format t: its integer weights and their scales, as ggml's dequantize_row_* reads them.
inline void decode_block(Type t, const uint8_t* b, Decoded& o) {
  std::memset(o.min, 0, sizeof(o.min));
  switch (t) {
    case Type::Q4_0: {
      o.group = 32;
      o.scale[0] = fp16(b);
      for (int j = 0; j < 16; ++j) {
        o.q[j] = static_cast<int8_t>((b[2 + j] & 0xF) - 8);
        o.q[j + 16] = static_cast<int8_t>((b[2 + j] >> 4) - 8);
      }
      return;
    }
    case Type::Q5_0: {
      o.group = 32;
      o.scale[0] = fp16(b);
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      for (int j = 0; j < 16; ++j) {
        o.q[j] = static_cast<int8_t>(((b[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
        o.q[j + 16] = static_cast<int8_t>(((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
      }
      return;
    }
    case Type::Q8_0: {
      o.group = 32;
      o.scale[0] = fp16(b);
      std::memcpy(o.q, b + 2, 32);
      return;
    }
    case Type::Q4_K:
    case Type::Q5_K: {
      o.group = 32;
      const float d = fp16(b), dmin = fp16(b + 2);
      const uint8_t* scales = b + 4;
      const bool five = t == Type::Q5_K;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = five ? b + 48 : b + 16;
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        k4_scale_min(j, scales, sc, m);
        o.scale[j] = d * static_cast<float>(sc);
        o.min[j] = dmin * static_cast<float>(m);
        const uint8_t* q = qs + 32 * (j / 2);
        for (int l = 0; l < 32; ++l) {
          int v = (j % 2 == 0) ? (q[l] & 0xF) : (q[l] >> 4);
          if (five) v |= ((qh[l] >> j) & 1) << 4;
          o.q[32 * j + l] = static_cast<int8_t>(v);
        }
      }
      return;
    }
    case Type::Q6_K: {
      o.group = 16;
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = fp16(b + 208);
      for (int i = 0; i < 16; ++i) o.scale[i] = d * static_cast<float>(sc[i]);
      for (int n = 0; n < 2; ++n) {
        const uint8_t* l0 = ql + 64 * n;
        const uint8_t* h = qh + 32 * n;
        int8_t* q = o.q + 128 * n;
        for (int l = 0; l < 32; ++l) {
          q[l] = static_cast<int8_t>(((l0[l] & 0xF) | (((h[l] >> 0) & 3) << 4)) - 32);
          q[l + 32] = static_cast<int8_t>(((l0[l + 32] & 0xF) | (((h[l] >> 2) & 3) << 4)) - 32);
          q[l + 64] = static_cast<int8_t>(((l0[l] >> 4) | (((h[l] >> 4) & 3) << 4)) - 32);
          q[l + 96] = static_cast<int8_t>(((l0[l + 32] >> 4) | (((h[l] >> 6) & 3) << 4)) - 32);
        }
      }
      return;
    }
  }
}

// Dequantizes `blocks` consecutive blocks of format f into out (blocks * block_elems floats).
inline void dequantize_blocks(const Format& f, const uint8_t* b, int64_t blocks, float* out) {
  Decoded d;
  for (int64_t i = 0; i < blocks; ++i, b += f.block_bytes, out += f.block_elems) {
    decode_block(f.type, b, d);
    for (int64_t e = 0; e < f.block_elems; ++e)
      out[e] = d.min[e / 32] == 0.f ? d.scale[e / d.group] * d.q[e] : d.scale[e / d.group] * d.q[e] - d.min[e / 32];
  }
}

}  // namespace gguf
}  // namespace gemma3_fast
