// A compact BPE tokenizer with the semantics of a Hugging Face `tokenizers` tokenizer.json of the SentencePiece
// kind Gemma ships (normalizer Replace(" ", "▁"), BPE with byte fallback and ranked merges, decoder Replace("▁",
// " ") + ByteFallback + Fuse, added tokens matched whole, leftmost-longest). gemma3_fast/tokenizer.py checks that
// a tokenizer.json has exactly that shape before it hands it here, and keeps `tokenizers` for any other.
//
// Why: `tokenizers` holds Gemma's 262144 tokens and 513511 merges in Rust hash maps of owned strings, ~76 MiB
// resident, a seventh of the default run's memory. Here the same data are one byte blob with offsets, an
// open-addressing index of ids and the merges grouped by left token: ~14 MB, mapped from a cache file.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace gemma3_fast {

class BpeTokenizer {
 public:
  // blob: every token's UTF-8 bytes, concatenated (uint8); offsets: int64 [n + 1], token i is
  // blob[offsets[i], offsets[i + 1]); merges: int64 [m, 2], the (left, right) ids in rank order (each merges into
  // the token spelled left + right); added_ids / added_flags: int64 [a], the added tokens (matched whole before
  // the model runs) and their flags (1: special, skipped by decode(skip_special); 2: matched in the normalized
  // text, not the raw one); unk_id: the unknown token or -1.
  BpeTokenizer(const at::Tensor& blob, const at::Tensor& offsets, const at::Tensor& merges,
               const at::Tensor& added_ids, const at::Tensor& added_flags, int64_t unk_id, bool fuse_unk,
               bool byte_fallback);
  // The tables as save() wrote them, mapped read-only: loading takes a millisecond, only the pages a run
  // touches become resident (see huge_pages.drop_from_page_cache for what that depends on), and the page
  // cache holds one copy for every process.
  static std::unique_ptr<BpeTokenizer> load(const std::string& path);
  static constexpr int kFileVersion = 4;  // of save()'s layout: load() refuses another
  void save(const std::string& path) const;
  ~BpeTokenizer();
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const;
  int64_t token_to_id(const std::string& token) const;  // -1 when absent
  std::string id_to_token(int64_t id) const;            // "" when out of range
  int64_t size() const { return n_; }
  int64_t memory_bytes() const;  // heap owned (a mapped tokenizer's tables are the file's pages)
  bool mapped() const { return map_ != nullptr; }

 private:
  BpeTokenizer() = default;
  // Added tokens of one kind (raw or normalized): their ids by spelling, and per first byte the distinct
  // lengths, longest first, so a position is tried against a handful of lengths.
  struct AddedMatcher {
    std::vector<int32_t> ids;                           // open addressing over the added ids
    std::vector<std::vector<uint32_t>> lengths_by_byte;  // [256]
    // Bit (b0 << 8 | b1): some added token of two or more bytes starts with b0 b1. Gemma has 30 runs of spaces
    // as added tokens: without this, each space in a text cost 30 hash lookups.
    std::vector<uint64_t> first_pairs;  // [65536 / 64]
    bool may_start(unsigned char b0, unsigned char b1) const {
      const unsigned k = b0 << 8 | b1;
      return (first_pairs[k >> 6] >> (k & 63)) & 1;
    }
    bool empty() const { return ids.empty(); }
  };
  struct Piece {  // a stretch of text, or an added token already matched
    std::string_view text;
    int32_t id;  // -1 for text
  };

  // Bounds-checked: a damaged mapped file gives wrong tokens, never a read outside it.
  std::string_view token(int64_t id) const {
    if (id < 0 || id >= n_) return {};
    const uint32_t a = offsets_[id], b = offsets_[id + 1];
    if (b < a || b > blob_size_) return {};
    return {blob_ + a, static_cast<size_t>(b - a)};
  }
  // Open-addressing tables of ids (the vocabulary's index, each added-token matcher's), keyed by spelling.
  size_t slot_of(const int32_t* slots, size_t n_slots, std::string_view s) const;
  int32_t lookup_in(const int32_t* slots, size_t n_slots, std::string_view s) const;
  int32_t lookup(std::string_view s) const { return lookup_in(index_, index_slots_, s); }
  int32_t char_id(std::string_view ch) const;  // lookup of one character, ASCII and "▁" remembered
  void build_added(AddedMatcher& m, const std::vector<int32_t>& ids);
  void find_byte_tokens();
  void build_matchers();  // the added-token matchers, from the tables
  void split_added(const AddedMatcher& m, std::string_view text, std::vector<Piece>& out) const;
  void bpe(std::string_view word, std::vector<int64_t>& out) const;
  // (rank, merged id) of the pair, or rank -1.
  std::pair<int32_t, int32_t> merge_of(int32_t left, int32_t right) const;

  // The tables: views of the owned vectors below, or of the mapped file.
  const char* blob_ = nullptr;
  size_t blob_size_ = 0;
  const uint32_t* offsets_ = nullptr;  // [n + 1]
  int64_t n_ = 0;
  const int32_t* index_ = nullptr;  // open addressing: token id or -1, by hash of its spelling
  size_t index_slots_ = 0;          // a power of two
  // Merges sorted by (left, right): merge_first_[left] .. merge_first_[left + 1] is left's range, searched by
  // right. A lookup touches two places (most lefts have a handful of merges), not the ~19 of a binary search over
  // all 513511: with the tables mapped, fewer pages become resident.
  struct Merge {  // one entry: what a lookup reads together sits together
    int32_t right, rank, id;
  };
  static_assert(sizeof(Merge) == 3 * sizeof(int32_t), "the file layout stores a merge in 12 bytes");
  const uint32_t* merge_first_ = nullptr;  // [n + 1]
  const Merge* merges_ = nullptr;
  size_t n_merges_ = 0;
  const uint8_t* special_ = nullptr;  // per id: decode(skip_special) drops it
  const int32_t* added_ids_ = nullptr;
  const int32_t* added_flags_ = nullptr;
  size_t n_added_ = 0;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false, byte_fallback_ = false;

  std::string own_blob_;
  std::vector<uint32_t> own_offsets_;
  std::vector<int32_t> own_index_, own_added_ids_, own_added_flags_;
  std::vector<uint32_t> own_merge_first_;
  std::vector<Merge> own_merges_;
  std::vector<uint8_t> own_special_;
  void* map_ = nullptr;
  size_t map_size_ = 0;

  AddedMatcher added_raw_, added_normalized_;
  int32_t byte_ids_[256];  // <0xXX> tokens, -1 where missing (in the file's header: no lookups at load)
  // The ids of the one-character tokens most text is made of (ASCII, then "▁"), looked up on first use rather
  // than at load (each lookup makes a page of the mapped index resident); kUnknownId until then. Atomics: encode
  // runs without the GIL, from any thread.
  static constexpr int32_t kUnknownId = -2;
  mutable std::atomic<int32_t> common_char_ids_[129];
};

}  // namespace gemma3_fast
