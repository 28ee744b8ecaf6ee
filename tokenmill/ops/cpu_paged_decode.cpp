// Paged decode attention on the CPU: one-token queries against their context read in place from the
// paged KV cache, without first gathering the blocks into a copy. Built by cpu_paged_decode.py
// (torch.utils.cpp_extension, with the vector ISA inductor picks for this machine: ATen's
// Vectorized<float> is then 16 lanes on AVX-512, 8 on AVX2). Tested against attention in float64
// (tests/unit/test_cpu_paged_decode.py) and, through the cpu backend, against torch_native.
//
// One task per (request, KV head), the query heads sharing that KV head together. Each key row is
// widened to float32 in registers as it is read and scored against every head of the group (the
// query in float32, scale folded in); the scores' maximum and exp(score - max) are vector passes;
// then each value row, widened the same way, is added into the group's accumulators with its
// weights. Everything accumulates in float32; the output is rounded to the model's dtype once. The
// rows lie block by block anywhere in the pool, so the loop prefetches the key rows a few tokens
// ahead and the value rows while scoring (at 1,000 tokens of context, 1.3x without it).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_flash_prefill.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// widen(): a row of the cache (or a query) in float32. bf16 is the top half of a float32, so
// widening it is a shift, which the compiler vectorises.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
inline void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// scores[0:n] = exp(scores - max); returns their sum.
inline float exp_and_sum(float* scores, int64_t n, float max) {
  const Vec shift(max);
  Vec sum(0.f);
  int64_t t = 0;
  for (; t + Vec::size() <= n; t += Vec::size()) {
    const Vec e = (Vec::loadu(scores + t) - shift).exp_u20();
    e.store(scores + t);
    sum = sum + e;
  }
  float total = sum.reduce_add();
  for (; t < n; ++t) {
    scores[t] = std::exp(scores[t] - max);
    total += scores[t];
  }
  return total;
}

// The most float vectors a head may span (head_dim 256 on AVX2).
constexpr int64_t kMaxChunks = 32;

// A row of `chunks` float vectors widened in registers. bf16 and half load two vectors' worth at once.
template <typename T>
inline void load_row(const T* src, int64_t chunks, Vec* out) {
  constexpr int64_t W = Vec::size();
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t c = 0; c < chunks; ++c) out[c] = Vec::loadu(src + c * W);
  } else {
    using Wide = at::vec::Vectorized<T>;
    for (int64_t c = 0; c < chunks; c += 2) {
      const Wide half_row = c + 1 < chunks ? Wide::loadu(src + c * W) : Wide::loadu(src + c * W, W);
      auto [lo, hi] = at::vec::convert_to_float<T>(half_row);
      out[c] = lo;
      if (c + 1 < chunks) out[c + 1] = hi;
    }
  }
}

constexpr int64_t kPrefetchAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = n * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
}

// The attention of one (request, KV head) task. CHUNKS: head_dim in float vectors, fixed at compile
// time for the common head sizes (the loops unroll, the row stays in registers); 0: `chunks` at
// run time. query: [group, head_dim] float32, already scaled; scores: [group, len]; acc: [group, head_dim].
template <typename T, int64_t CHUNKS>
void attend(const float* query, int64_t group, int64_t chunks, const T* k_base, const T* v_base,
            const int32_t* blocks, int64_t block_size, int64_t k_block, int64_t k_row, int64_t v_block,
            int64_t v_row, int64_t len, float* scores, float* maxima, float* acc, float* inverse) {
  constexpr int64_t W = Vec::size();
  const int64_t n = CHUNKS ? CHUNKS : chunks;
  for (int64_t g = 0; g < group; ++g) maxima[g] = -std::numeric_limits<float>::infinity();
  const auto k_at = [&](int64_t t) { return k_base + blocks[t / block_size] * k_block + (t % block_size) * k_row; };
  const auto v_at = [&](int64_t t) { return v_base + blocks[t / block_size] * v_block + (t % block_size) * v_row; };
  Vec row[CHUNKS ? CHUNKS : kMaxChunks];
  for (int64_t t = 0; t < len; ++t) {
    // The rows lie block by block anywhere in the pool, where the hardware prefetcher cannot
    // follow: the key row kPrefetchAhead tokens on, and this token's value row for the pass below.
    if (t + kPrefetchAhead < len) prefetch_row(k_at(t + kPrefetchAhead), n * W);
    prefetch_row(v_at(t), n * W);
    load_row<T>(k_at(t), n, row);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = query + g * n * W;
      Vec sum = Vec::loadu(qg) * row[0];
      for (int64_t c = 1; c < n; ++c) sum = at::vec::fmadd(Vec::loadu(qg + c * W), row[c], sum);
      const float score = sum.reduce_add();
      scores[g * len + t] = score;
      maxima[g] = std::max(maxima[g], score);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float total = exp_and_sum(scores + g * len, len, maxima[g]);
    inverse[g] = total > 0.f ? 1.f / total : 0.f;
  }
  std::fill(acc, acc + group * n * W, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    load_row<T>(v_at(t), n, row);
    for (int64_t g = 0; g < group; ++g) {
      const Vec weight(scores[g * len + t]);
      float* ag = acc + g * n * W;
      for (int64_t c = 0; c < n; ++c) at::vec::fmadd(weight, row[c], Vec::loadu(ag + c * W)).store(ag + c * W);
    }
  }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  const int64_t num_reqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, chunks = head_dim / Vec::size();
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k_cache.data_ptr<T>();
  const T* v_data = v_cache.data_ptr<T>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* out_data = out.data_ptr<T>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t q_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t k_block = k_cache.stride(0), k_row = k_cache.stride(1), k_head = k_cache.stride(2);
  const int64_t v_block = v_cache.stride(0), v_row = v_cache.stride(1), v_head = v_cache.stride(2);
  const float fscale = static_cast<float>(scale);
  const auto task_attend = chunks == 2 ? attend<T, 2> : chunks == 4 ? attend<T, 4> : chunks == 8 ? attend<T, 8>
                                                                                                 : attend<T, 0>;

  at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), acc(group * head_dim), scores, maxima(group), inverse(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t req = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t len = lens[req];
      for (int64_t g = 0; g < group; ++g) {
        float* dst = query.data() + g * head_dim;
        widen(q_data + req * q_stride + (kv_head * group + g) * q_head_stride, dst, head_dim);
        for (int64_t d = 0; d < head_dim; ++d) dst[d] *= fscale;
      }
      scores.resize(group * len);
      task_attend(query.data(), group, chunks, k_data + kv_head * k_head, v_data + kv_head * v_head,
                  table + req * table_stride, block_size, k_block, k_row, v_block, v_row, len, scores.data(),
                  maxima.data(), acc.data(), inverse.data());
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out_data + (req * num_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[g * head_dim + d] * inverse[g]);
      }
    }
  });
}

// q [B, heads, head_dim]; k_cache / v_cache [blocks, block_size, kv_heads, head_dim] (head_dim
// contiguous); block_table [>= B, >= blocks] int32; seq_lens [B] int32, each >= 1. Returns
// [B, heads, head_dim].
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode: bad ranks");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the cache must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode: head_dim must be contiguous");
  TORCH_CHECK(q.size(2) % Vec::size() == 0 && q.size(2) / Vec::size() <= kMaxChunks,
              "paged_decode: head_dim must be a multiple of ", Vec::size(), " and at most ", kMaxChunks * Vec::size());
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1, "paged_decode: block table rows contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_decode: int32 block table and lengths");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_decode: heads not a multiple of KV heads");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const at::Tensor lens = seq_lens.contiguous();
  switch (q.scalar_type()) {
    case at::kBFloat16: decode<c10::BFloat16>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    case at::kHalf: decode<c10::Half>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    case at::kFloat: decode<float>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode: unsupported dtype ", q.scalar_type());
  }
  return out;
}

// The step's k or v rows [T, kv_heads, head_dim] into their cache slots: a row copy each where the
// row is contiguous (index_copy_'s set-up cost ~12 us a call, 60 calls a step), else index_copy_.
void write_rows(const at::Tensor& x, at::Tensor& cache, const at::Tensor& slot_mapping, int64_t num_tokens) {
  const int64_t num_kv_heads = cache.size(2), head_dim = cache.size(3), row = num_kv_heads * head_dim;
  if (x.stride(2) != 1 || x.stride(1) != head_dim || !cache.is_contiguous() || slot_mapping.stride(0) != 1) {
    cache.view({-1, num_kv_heads, head_dim}).index_copy_(0, slot_mapping.slice(0, 0, num_tokens), x);
    return;
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t src_stride = x.stride(0) * x.element_size();
  const int64_t capacity = cache.numel() / row;
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "KV slot ", slots[t], " outside the cache");
    std::memcpy(dst + slots[t] * bytes, src + t * src_stride, bytes);
  }
}

// A layer's attention step, as `tokenmill::cpu_paged_attention` (model/attention/cpu.py) computes it,
// for the steps that are decodes and fresh prefills (nothing cached before the prompt) into a cache
// of q's dtype: the KV write, the decodes through the kernel above and each prefill on its own
// k / v, through the AMX flash kernel (cpu_flash_prefill.cpp) for bf16 where the machine has
// the tile units, else causal SDPA as the Python op does, without entering Python (~50 us a layer for
// a decode step, ~100 us for a prefill). Every other step (a chunk after cached tokens, an encoder,
// an fp8 cache) goes to that Python op, through the dispatcher.
at::Tensor attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                          at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale, double k_scale,
                          double v_scale, bool causal) {
  const int64_t num_tokens = q.size(0), num_reqs = query_start_loc.size(0) - 1;
  bool native = k_cache.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                slot_mapping.scalar_type() == at::kLong && q.size(2) % Vec::size() == 0;
  int64_t num_decodes = 0;
  if (native) {
    const int32_t* starts = query_start_loc.data_ptr<int32_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    for (int64_t i = 0; i < num_tokens && native; ++i) native = slots[i] >= 0;
    while (num_decodes < num_reqs && starts[num_decodes + 1] - starts[num_decodes] == 1) ++num_decodes;
    for (int64_t i = num_decodes; i < num_reqs && native; ++i)  // fresh causal prefills only
      native = causal && lens[i] == starts[i + 1] - starts[i];
  }
  if (!native) {
    static auto general = c10::Dispatcher::singleton()
        .findSchemaOrThrow("tokenmill::cpu_paged_attention", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                          double, bool, bool)>();
    return general.call(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens, query_start_loc, scale,
                        k_scale, v_scale, causal, true);
  }
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  write_rows(k, k_cache, slot_mapping, num_tokens);
  write_rows(v, v_cache, slot_mapping, num_tokens);
  if (num_decodes == num_tokens)
    return paged_decode(q, k_cache, v_cache, block_table, seq_lens.slice(0, 0, num_decodes), scale);
  at::Tensor out = at::empty_like(q);
  if (num_decodes)
    out.slice(0, 0, num_decodes).copy_(paged_decode(q.slice(0, 0, num_decodes), k_cache, v_cache, block_table,
                                                    seq_lens.slice(0, 0, num_decodes), scale));
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const bool grouped = q.size(1) != num_kv_heads;
  const bool flash = q.scalar_type() == at::kBFloat16 && tokenmill_cpu::flash_prefill_supported(head_dim);
  for (int64_t i = num_decodes; i < num_reqs; ++i) {
    const int64_t begin = starts[i], end = starts[i + 1];
    if (flash) {
      // `out` is empty_like(q): contiguous, unless q is a dense permutation of [T, H, D].
      at::Tensor rows = out.slice(0, begin, end);
      if (rows.is_contiguous()) {
        tokenmill_cpu::flash_prefill_into(q.slice(0, begin, end), k.slice(0, begin, end), v.slice(0, begin, end),
                                          scale, rows);
      } else {
        rows.copy_(tokenmill_cpu::flash_prefill(q.slice(0, begin, end), k.slice(0, begin, end),
                                                v.slice(0, begin, end), scale));
      }
      continue;
    }
    const auto heads_first = [&](const at::Tensor& x) { return x.slice(0, begin, end).transpose(0, 1).unsqueeze(0); };
    const at::Tensor attended = at::scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                                                 std::nullopt, 0.0, true, scale, grouped);
    out.slice(0, begin, end).copy_(attended.squeeze(0).transpose(0, 1));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("cpu_paged_attention_native(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, float scale, "
        "float k_scale, float v_scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("cpu_paged_attention_native", &attention_step);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention, the cache read in place");
  m.def("vector_width", [] { return static_cast<int64_t>(Vec::size()); });
  m.def("flash_prefill", &tokenmill_cpu::flash_prefill, "causal bf16 prefill attention on the AMX tile units");
  m.def("flash_prefill_supported", &tokenmill_cpu::flash_prefill_supported);
}
