// BpeTokenizer (bpe_tokenizer.h): encode and decode as `tokenizers` does for Gemma's tokenizer.json. The steps
// and their order follow tokenizers' Tokenizer::encode (added tokens split off the raw text, the rest normalized,
// normalized added tokens split off, BPE on each remaining piece) and BPE::merge_word / Word::merge_all (byte
// fallback per character, then the lowest-ranked adjacent pair merged first, the leftmost among equals).
#include "bpe_tokenizer.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <queue>

namespace gemma3_fast {
namespace {

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

size_t table_size(size_t n) {  // a power of two, at most half full
  size_t size = 16;
  while (size < 2 * n) size *= 2;
  return size;
}

// Bytes of the UTF-8 character whose first byte is c (1 for a stray continuation byte, as Rust never sees one:
// the text came from a str).
size_t utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

// Rust's String::from_utf8 acceptance: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const std::string& s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      i += 1;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return false;
    i += len;
  }
  return true;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The ByteFallback decoder's test: "<0xHH>" is the byte HH (u8::from_str_radix of "HH", which also takes "+H").
int byte_of_token(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  if (t[3] == '+') return hex_digit(t[4]);
  const int hi = hex_digit(t[3]), lo = hex_digit(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

constexpr std::string_view kSpace = " ";
constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581, SentencePiece's word marker

std::vector<int64_t> int64_values(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt),
              "BpeTokenizer: ", name, " must be a CPU int32/int64 tensor, got ", t.scalar_type(), " on ", t.device());
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

BpeTokenizer::BpeTokenizer(const at::Tensor& blob, const at::Tensor& offsets, const at::Tensor& merges,
                           const at::Tensor& added_ids, const at::Tensor& added_flags, int64_t unk_id,
                           bool fuse_unk, bool byte_fallback)
    : fuse_unk_(fuse_unk), byte_fallback_(byte_fallback) {
  TORCH_CHECK(blob.device().is_cpu() && blob.scalar_type() == at::kByte && blob.dim() == 1,
              "BpeTokenizer: blob must be a 1-D CPU uint8 tensor");
  const at::Tensor b = blob.contiguous();
  own_blob_.assign(reinterpret_cast<const char*>(b.data_ptr<uint8_t>()), b.numel());
  TORCH_CHECK(own_blob_.size() < (uint64_t{1} << 32), "BpeTokenizer: the tokens' bytes must be under 4 GiB");
  const std::vector<int64_t> offs = int64_values(offsets, "offsets");
  TORCH_CHECK(offs.size() >= 2 && offs.front() == 0 && offs.back() == static_cast<int64_t>(own_blob_.size()),
              "BpeTokenizer: offsets must run from 0 to the blob's length (", own_blob_.size(), " bytes)");
  for (size_t i = 1; i < offs.size(); ++i)
    TORCH_CHECK(offs[i] >= offs[i - 1], "BpeTokenizer: offsets must not decrease (at ", i, ")");
  own_offsets_.assign(offs.begin(), offs.end());
  blob_ = own_blob_.data(), blob_size_ = own_blob_.size();
  offsets_ = own_offsets_.data(), n_ = static_cast<int64_t>(own_offsets_.size()) - 1;
  TORCH_CHECK(n_ < (int64_t{1} << 31), "BpeTokenizer: more than 2^31 tokens");
  const auto n = static_cast<int32_t>(n_);

  own_index_.assign(table_size(n), -1);
  index_ = own_index_.data(), index_slots_ = own_index_.size();
  for (int32_t id = 0; id < n; ++id) {
    const size_t h = slot_of(index_, index_slots_, token(id));
    TORCH_CHECK(own_index_[h] < 0, "BpeTokenizer: tokens ", own_index_[h], " and ", id, " are both spelled '",
                std::string(token(id)), "'");
    own_index_[h] = id;
  }
  TORCH_CHECK(unk_id >= -1 && unk_id < n, "BpeTokenizer: unk_id ", unk_id, " is not a token id (vocabulary of ", n,
              ")");
  unk_id_ = static_cast<int32_t>(unk_id);

  // Merges: the pair's key, its rank and the token it makes. tokenizers keeps the last of a repeated pair.
  const std::vector<int64_t> m = int64_values(merges, "merges");
  TORCH_CHECK(merges.dim() == 2 && merges.size(1) == 2, "BpeTokenizer: merges must be [m, 2] (left, right) ids");
  const size_t count = m.size() / 2;
  std::vector<std::pair<uint64_t, uint32_t>> keyed(count);  // (pair key, rank): sorted, the ranks of a key ascend
  for (size_t r = 0; r < count; ++r) {
    const int64_t l = m[2 * r], rt = m[2 * r + 1];
    TORCH_CHECK(l >= 0 && l < n && rt >= 0 && rt < n, "BpeTokenizer: merge ", r, " (", l, ", ", rt,
                ") names a token id outside the vocabulary of ", n);
    keyed[r] = {(static_cast<uint64_t>(l) << 32) | static_cast<uint64_t>(rt), static_cast<uint32_t>(r)};
  }
  std::sort(keyed.begin(), keyed.end());
  own_merges_.reserve(count);
  std::string merged;
  for (size_t k = 0; k < count; ++k) {
    if (k + 1 < count && keyed[k + 1].first == keyed[k].first) continue;  // a later rank of the same pair follows
    const auto [key, r] = keyed[k];
    const auto l = static_cast<int32_t>(key >> 32), rt = static_cast<int32_t>(key & 0xFFFFFFFFu);
    merged.assign(token(l));
    merged += token(rt);
    const int32_t id = lookup(merged);
    TORCH_CHECK(id >= 0, "BpeTokenizer: merge ", r, " ('", std::string(token(l)), "', '", std::string(token(rt)),
                "') makes '", merged, "', which is not in the vocabulary");
    own_merges_.push_back({rt, static_cast<int32_t>(r), id});
  }
  TORCH_CHECK(own_merges_.size() < (uint64_t{1} << 31), "BpeTokenizer: more than 2^31 merges");
  own_merge_first_.assign(n + 1, 0);  // counts per left id, then their running sum
  for (size_t k = 0; k < count; ++k)
    if (k + 1 == count || keyed[k + 1].first != keyed[k].first) ++own_merge_first_[(keyed[k].first >> 32) + 1];
  for (int32_t i = 0; i < n; ++i) own_merge_first_[i + 1] += own_merge_first_[i];
  merge_first_ = own_merge_first_.data(), merges_ = own_merges_.data(), n_merges_ = own_merges_.size();

  const std::vector<int64_t> ids = int64_values(added_ids, "added_ids");
  const std::vector<int64_t> flags = int64_values(added_flags, "added_flags");
  TORCH_CHECK(ids.size() == flags.size(), "BpeTokenizer: added_ids and added_flags differ in length");
  own_special_.assign(n, 0);
  for (size_t i = 0; i < ids.size(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "BpeTokenizer: added token id ", ids[i], " is outside the vocabulary");
    own_added_ids_.push_back(static_cast<int32_t>(ids[i]));
    own_added_flags_.push_back(static_cast<int32_t>(flags[i]));
    if (flags[i] & 1) own_special_[ids[i]] = 1;
  }
  special_ = own_special_.data();
  added_ids_ = own_added_ids_.data(), added_flags_ = own_added_flags_.data(), n_added_ = own_added_ids_.size();
  find_byte_tokens();
  build_matchers();
}

void BpeTokenizer::find_byte_tokens() {
  for (int v = 0; v < 256; ++v) {
    static const char* digits = "0123456789ABCDEF";
    const char name[7] = {'<', '0', 'x', digits[v >> 4], digits[v & 15], '>', 0};
    byte_ids_[v] = lookup(name);
  }
}

void BpeTokenizer::build_matchers() {
  for (auto& id : common_char_ids_) id.store(kUnknownId, std::memory_order_relaxed);
  std::vector<int32_t> raw, normalized;
  for (size_t i = 0; i < n_added_; ++i) {
    if (added_ids_[i] < 0 || added_ids_[i] >= n_) continue;
    (added_flags_[i] & 2 ? normalized : raw).push_back(added_ids_[i]);
  }
  build_added(added_raw_, raw);
  build_added(added_normalized_, normalized);
}

// The file save() writes and load() maps: a header of counts, then each table at a 64-byte boundary.
namespace {

constexpr char kMagic[8] = {'G', '3', 'B', 'P', 'E', 0, 0, BpeTokenizer::kFileVersion};

struct FileHeader {
  char magic[8];
  uint64_t n, blob_size, index_slots, n_merges, n_added;
  int64_t unk_id;
  uint64_t fuse_unk, byte_fallback;
  int32_t byte_ids[256];
};

struct Layout {  // byte offsets of the tables in the file
  size_t blob, offsets, index, merge_first, merges, special, added_ids, added_flags, end;
};

size_t align64(size_t x) { return (x + 63) & ~size_t{63}; }

Layout layout_of(const FileHeader& h) {
  Layout l;
  l.blob = align64(sizeof(FileHeader));
  l.offsets = align64(l.blob + h.blob_size);
  l.index = align64(l.offsets + (h.n + 1) * sizeof(uint32_t));
  l.merge_first = align64(l.index + h.index_slots * sizeof(int32_t));
  l.merges = align64(l.merge_first + (h.n + 1) * sizeof(uint32_t));
  l.special = align64(l.merges + h.n_merges * 3 * sizeof(int32_t));
  l.added_ids = align64(l.special + h.n);
  l.added_flags = align64(l.added_ids + h.n_added * sizeof(int32_t));
  l.end = l.added_flags + h.n_added * sizeof(int32_t);
  return l;
}

}  // namespace

void BpeTokenizer::save(const std::string& path) const {
  FileHeader h{};
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.n = n_, h.blob_size = blob_size_, h.index_slots = index_slots_, h.n_merges = n_merges_, h.n_added = n_added_;
  h.unk_id = unk_id_, h.fuse_unk = fuse_unk_, h.byte_fallback = byte_fallback_;
  std::memcpy(h.byte_ids, byte_ids_, sizeof(byte_ids_));
  const Layout l = layout_of(h);
  std::string out(l.end, '\0');
  std::memcpy(out.data(), &h, sizeof(h));
  std::memcpy(out.data() + l.blob, blob_, blob_size_);
  std::memcpy(out.data() + l.offsets, offsets_, (n_ + 1) * sizeof(uint32_t));
  std::memcpy(out.data() + l.index, index_, index_slots_ * sizeof(int32_t));
  std::memcpy(out.data() + l.merge_first, merge_first_, (n_ + 1) * sizeof(uint32_t));
  std::memcpy(out.data() + l.merges, merges_, n_merges_ * sizeof(Merge));
  std::memcpy(out.data() + l.special, special_, n_);
  std::memcpy(out.data() + l.added_ids, added_ids_, n_added_ * sizeof(int32_t));
  std::memcpy(out.data() + l.added_flags, added_flags_, n_added_ * sizeof(int32_t));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  TORCH_CHECK(f != nullptr, "BpeTokenizer.save: cannot open ", path, " for writing: ", std::strerror(errno));
  const size_t written = std::fwrite(out.data(), 1, out.size(), f);
  const bool closed = std::fclose(f) == 0;
  TORCH_CHECK(written == out.size() && closed, "BpeTokenizer.save: writing ", path, " failed: ", std::strerror(errno));
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::load(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(fd >= 0, "BpeTokenizer.load: cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(FileHeader))) {
    ::close(fd);
    TORCH_CHECK(false, "BpeTokenizer.load: ", path, " is too short for a tokenizer table file");
  }
  void* map = ::mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  TORCH_CHECK(map != MAP_FAILED, "BpeTokenizer.load: cannot map ", path, ": ", std::strerror(errno));
  // Lookups jump around the tables: read only the pages they touch, not the neighbours.
  ::madvise(map, st.st_size, MADV_RANDOM);
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  t->map_ = map, t->map_size_ = st.st_size;  // unmapped by the destructor from here on
  FileHeader h;
  std::memcpy(&h, map, sizeof(h));
  TORCH_CHECK(std::memcmp(h.magic, kMagic, sizeof(kMagic)) == 0, "BpeTokenizer.load: ", path,
              " is not a tokenizer table file of this version");
  TORCH_CHECK(h.n > 0 && h.n < (uint64_t{1} << 31) && h.index_slots >= 2 * h.n &&
                  (h.index_slots & (h.index_slots - 1)) == 0 && h.n_merges < (uint64_t{1} << 40) &&
                  h.n_added <= h.n && h.blob_size < (uint64_t{1} << 32) && h.unk_id >= -1 &&
                  h.unk_id < static_cast<int64_t>(h.n),
              "BpeTokenizer.load: ", path, " has an inconsistent header");
  const Layout l = layout_of(h);
  TORCH_CHECK(l.end == static_cast<size_t>(st.st_size), "BpeTokenizer.load: ", path, " is ", st.st_size,
              " bytes, its header says ", l.end);
  const char* base = static_cast<const char*>(map);
  t->blob_ = base + l.blob, t->blob_size_ = h.blob_size;
  t->offsets_ = reinterpret_cast<const uint32_t*>(base + l.offsets), t->n_ = static_cast<int64_t>(h.n);
  t->index_ = reinterpret_cast<const int32_t*>(base + l.index), t->index_slots_ = h.index_slots;
  t->merge_first_ = reinterpret_cast<const uint32_t*>(base + l.merge_first);
  t->merges_ = reinterpret_cast<const Merge*>(base + l.merges);
  t->n_merges_ = h.n_merges;
  t->special_ = reinterpret_cast<const uint8_t*>(base + l.special);
  t->added_ids_ = reinterpret_cast<const int32_t*>(base + l.added_ids);
  t->added_flags_ = reinterpret_cast<const int32_t*>(base + l.added_flags);
  t->n_added_ = h.n_added;
  t->unk_id_ = static_cast<int32_t>(h.unk_id), t->fuse_unk_ = h.fuse_unk != 0, t->byte_fallback_ = h.byte_fallback != 0;
  for (int v = 0; v < 256; ++v) t->byte_ids_[v] = h.byte_ids[v] >= 0 && h.byte_ids[v] < t->n_ ? h.byte_ids[v] : -1;
  t->build_matchers();
  return t;
}

BpeTokenizer::~BpeTokenizer() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

// Linear probing from s's hash: the slot holding s's id, else the empty slot where it goes. SIZE_MAX when there
// is neither (a full table, or a damaged file's slot naming no token).
size_t BpeTokenizer::slot_of(const int32_t* slots, size_t n_slots, std::string_view s) const {
  const size_t mask = n_slots - 1;
  for (size_t h = fnv1a(s) & mask, probes = 0; probes < n_slots; h = (h + 1) & mask, ++probes) {
    const int32_t id = slots[h];
    if (id < 0) return h;
    if (id >= n_) return SIZE_MAX;
    if (token(id) == s) return h;
  }
  return SIZE_MAX;
}

int32_t BpeTokenizer::lookup_in(const int32_t* slots, size_t n_slots, std::string_view s) const {
  const size_t h = slot_of(slots, n_slots, s);
  return h == SIZE_MAX ? -1 : slots[h];
}

void BpeTokenizer::build_added(AddedMatcher& m, const std::vector<int32_t>& ids) {
  m.ids.clear();
  m.lengths_by_byte.assign(256, {});
  m.first_pairs.assign(65536 / 64, 0);
  if (ids.empty()) return;
  m.ids.assign(table_size(ids.size()), -1);
  for (const int32_t id : ids) {
    const std::string_view t = token(id);
    if (t.empty()) continue;  // an empty pattern matches nothing
    const size_t h = slot_of(m.ids.data(), m.ids.size(), t);
    if (m.ids[h] >= 0) continue;  // a repeat adds nothing
    m.ids[h] = id;
    auto& lengths = m.lengths_by_byte[static_cast<unsigned char>(t[0])];
    if (std::find(lengths.begin(), lengths.end(), t.size()) == lengths.end()) lengths.push_back(t.size());
    if (t.size() >= 2) {
      const unsigned k = static_cast<unsigned char>(t[0]) << 8 | static_cast<unsigned char>(t[1]);
      m.first_pairs[k >> 6] |= uint64_t{1} << (k & 63);
    }
  }
  for (auto& lengths : m.lengths_by_byte) std::sort(lengths.rbegin(), lengths.rend());
}

// Leftmost-longest: the earliest position where some added token starts, the longest one there.
void BpeTokenizer::split_added(const AddedMatcher& m, std::string_view text, std::vector<Piece>& out) const {
  if (m.empty()) {
    if (!text.empty()) out.push_back({text, -1});
    return;
  }
  size_t start = 0, i = 0;
  while (i < text.size()) {
    int32_t found = -1;
    size_t found_len = 0;
    const bool longer = i + 1 < text.size() && m.may_start(text[i], text[i + 1]);
    for (const uint32_t len : m.lengths_by_byte[static_cast<unsigned char>(text[i])]) {
      if (len > text.size() - i || (len >= 2 && !longer)) continue;
      found = lookup_in(m.ids.data(), m.ids.size(), text.substr(i, len));
      if (found >= 0) {
        found_len = len;
        break;
      }
    }
    if (found < 0) {
      ++i;
      continue;
    }
    if (i > start) out.push_back({text.substr(start, i - start), -1});
    out.push_back({text.substr(i, found_len), found});
    i += found_len;
    start = i;
  }
  if (start < text.size()) out.push_back({text.substr(start), -1});
}

int32_t BpeTokenizer::char_id(std::string_view ch) const {
  int slot = -1;
  if (ch.size() == 1 && static_cast<unsigned char>(ch[0]) < 128) slot = static_cast<unsigned char>(ch[0]);
  else if (ch == kMetaspace) slot = 128;
  if (slot < 0) return lookup(ch);
  int32_t id = common_char_ids_[slot].load(std::memory_order_relaxed);
  if (id == kUnknownId) {  // a race only looks the same id up twice
    id = lookup(ch);
    common_char_ids_[slot].store(id, std::memory_order_relaxed);
  }
  return id;
}

std::pair<int32_t, int32_t> BpeTokenizer::merge_of(int32_t left, int32_t right) const {
  if (left < 0 || left >= n_) return {-1, -1};
  const uint32_t a = merge_first_[left], b = merge_first_[left + 1];
  if (b < a || b > n_merges_) return {-1, -1};  // a damaged file's
  const Merge* it = std::lower_bound(merges_ + a, merges_ + b, right,
                                     [](const Merge& m, int32_t r) { return m.right < r; });
  if (it == merges_ + b || it->right != right || it->id < 0 || it->id >= n_) return {-1, -1};
  return {it->rank, it->id};
}

void BpeTokenizer::bpe(std::string_view word, std::vector<int64_t>& out) const {
  struct Symbol {
    int32_t c, prev, next, len;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t c, int32_t len) {
    const auto idx = static_cast<int32_t>(symbols.size());
    if (idx > 0) symbols.back().next = idx;
    symbols.push_back({c, idx - 1, -1, len});
  };
  // Characters to symbols (BPE::merge_word): the character's token, else its bytes' <0xXX> tokens, else unk
  // (runs of unknown characters fused into one when fuse_unk).
  int32_t unk_len = 0;  // pending unk's byte length, 0 when none
  for (size_t i = 0; i < word.size();) {
    const size_t len = std::min(utf8_length(static_cast<unsigned char>(word[i])), word.size() - i);
    const std::string_view ch = word.substr(i, len);
    i += len;
    const int32_t id = char_id(ch);
    if (id >= 0) {
      if (unk_len > 0) add(unk_id_, unk_len), unk_len = 0;
      add(id, static_cast<int32_t>(len));
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char c : ch) all = all && byte_ids_[c] >= 0;
      if (all) {  // as tokenizers: a pending unk stays pending across byte tokens
        for (unsigned char c : ch) add(byte_ids_[c], 1);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (unk_len > 0 && !fuse_unk_) add(unk_id_, unk_len), unk_len = 0;
      unk_len += static_cast<int32_t>(len);
    }
  }
  if (unk_len > 0) add(unk_id_, unk_len);

  // Word::merge_all: lowest rank first, then the leftmost position; entries made stale by earlier merges are
  // recognised and dropped when they come up. An entry whose pair is still in place is current without a lookup;
  // one whose pair changed is current when the new pair merges into the same id, as tokenizers checks it.
  struct Merge {
    int32_t rank, pos, new_id, left, right;
    bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Merge> queue;
  for (size_t p = 0; p + 1 < symbols.size(); ++p) {
    const auto [rank, id] = merge_of(symbols[p].c, symbols[p + 1].c);
    if (rank >= 0) queue.push({rank, static_cast<int32_t>(p), id, symbols[p].c, symbols[p + 1].c});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const Symbol right = symbols[cur.next];
    if ((cur.c != top.left || right.c != top.right) && merge_of(cur.c, right.c).second != top.new_id) continue;
    symbols[cur.next].len = 0;
    cur.c = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      const auto [rank, id] = merge_of(symbols[cur.prev].c, cur.c);
      if (rank >= 0) queue.push({rank, cur.prev, id, symbols[cur.prev].c, cur.c});
    }
    if (cur.next >= 0) {
      const auto [rank, id] = merge_of(cur.c, symbols[cur.next].c);
      if (rank >= 0) queue.push({rank, top.pos, id, cur.c, symbols[cur.next].c});
    }
  }
  for (const Symbol& s : symbols)
    if (s.len != 0) out.push_back(s.c);
}

std::vector<int64_t> BpeTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> out;
  std::vector<Piece> raw, pieces;
  split_added(added_raw_, text, raw);
  std::string normalized;
  for (const Piece& piece : raw) {
    if (piece.id >= 0) {
      out.push_back(piece.id);
      continue;
    }
    // The normalizer: every space becomes U+2581. It leaves no space for the Split(" ") pre-tokenizer to cut at.
    normalized.clear();
    for (const char c : piece.text) {
      if (c == kSpace[0]) normalized += kMetaspace;
      else normalized += c;
    }
    pieces.clear();
    split_added(added_normalized_, normalized, pieces);
    for (const Piece& p : pieces) {
      if (p.id >= 0) out.push_back(p.id);
      else bpe(p.text, out);
    }
  }
  return out;
}

std::string BpeTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  // Decoders Replace("▁", " "), ByteFallback (a run of <0xXX> tokens becomes its bytes when they are valid UTF-8,
  // else one U+FFFD per token), Fuse. Ids outside the vocabulary are dropped, as tokenizers drops them.
  std::string out, bytes;
  size_t byte_tokens = 0;
  auto flush = [&] {
    if (byte_tokens == 0) return;
    if (valid_utf8(bytes)) {
      out += bytes;
    } else {
      for (size_t k = 0; k < byte_tokens; ++k) out += "\xEF\xBF\xBD";
    }
    bytes.clear();
    byte_tokens = 0;
  };
  const int64_t n = size();
  for (const int64_t id : ids) {
    if (id < 0 || id >= n || (skip_special && special_[id])) continue;
    const std::string_view t = token(id);
    const int byte = byte_of_token(t);
    if (byte >= 0) {
      bytes += static_cast<char>(byte);
      ++byte_tokens;
      continue;
    }
    flush();
    for (size_t i = 0; i < t.size();) {
      if (t.compare(i, kMetaspace.size(), kMetaspace) == 0) {
        out += kSpace;
        i += kMetaspace.size();
      } else {
        out += t[i++];
      }
    }
  }
  flush();
  return out;
}

int64_t BpeTokenizer::token_to_id(const std::string& token) const { return lookup(token); }

std::string BpeTokenizer::id_to_token(int64_t id) const {
  return std::string(token(id));
}

int64_t BpeTokenizer::memory_bytes() const {
  size_t added = 0;
  for (const AddedMatcher* m : {&added_raw_, &added_normalized_}) {
    added += m->ids.capacity() * sizeof(int32_t);
    for (const auto& l : m->lengths_by_byte) added += l.capacity() * sizeof(uint32_t);
  }
  return static_cast<int64_t>(own_blob_.capacity() + own_offsets_.capacity() * sizeof(uint32_t) +
                              (own_index_.capacity() + own_added_ids_.capacity() + own_added_flags_.capacity()) *
                                  sizeof(int32_t) +
                              own_merge_first_.capacity() * sizeof(uint32_t) + own_merges_.capacity() * sizeof(Merge) +
                              own_special_.capacity() + added);
}

}  // namespace gemma3_fast
