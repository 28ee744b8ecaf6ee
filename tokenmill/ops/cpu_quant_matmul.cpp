// Products with GGUF block-quantised weights kept quantised on the CPU: y [M, N] = x [M, K] @ W.T
// (+ bias), W given as 4-bit (Q4_0 / Q4_1) or 8-bit (Q8_0) blocks of 32 input features, each block
// with its fp16 scale d (and, for 4 bits, its fp16 offset m: w = d * q + m).
//
// As llama.cpp does, the activations are quantised too, to int8 per block of 32 (scale sx =
// max|x| / 127), so that a block's dot product is integer arithmetic: AVX512-VNNI's vpdpbusd
// multiplies unsigned weight bytes by signed activation bytes and sums each four into an int32
// lane. The weights are repacked (exactly) so that the 16 lanes of a vector are 16 output rows:
// one vpdpbusd takes four consecutive weights of each of 16 rows against the same four activation
// bytes (broadcast straight from memory), eight of them cover a block, and the block's scales
// (d of 16 rows: one vector load; sx: one broadcast) apply to whole int32 sums. No lane mixes two
// rows, so no horizontal sums are needed, and the unpacked weights of 16 rows stay in registers
// while several activation rows pass over them (prefill and batched decode).
// PyTorch's own int4 CPU kernel instead unpacks the weight to float and multiplies in float.
//
// Weight layout (ops/cpu_quant_matmul.py packs it from the GGUF rows; rows padded to 16):
//   qs uint8 [N / 16, K / 32, 256 (4 bits) or 512 (8 bits)]: per group of 16 rows and block, the
//     block's 32 weights of the 16 rows in chunks of four (chunk c: weights 4c..4c+3):
//     8 bits: 8 vectors of 64 bytes, vector c byte 4 * row + j = q[row][4c + j] + 128 (unsigned,
//             as vpdpbusd wants it; the +128 comes back out through the activation's block sum,
//             the same for every row);
//     4 bits: 4 vectors, vector i byte 4 * row + j = q[row][8i + j] | q[row][8i + 4 + j] << 4
//             (chunk 2i in the low nibbles, chunk 2i + 1 in the high ones; q in 0..15).
//   d fp16 [N / 16, K / 32, 16]; m fp16 the same (4 bits only; Q4_0 packs as m = -8 d).
// With 4 bits the offset term sum_b m_b * (sum of x over b) uses the exact float block sums of x.
//
// Without AVX512-VNNI the same arithmetic runs as plain loops (correct, slow: the Python side then
// keeps PyTorch's kernels; `cpu_quant_matmul_vectorized` says which). Tested against the float64
// product (tests/unit/test_cpu_quant_matmul.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TM_QUANT_VNNI 1
#endif

namespace {

constexpr int64_t kBlock = 32;  // input features per scale
constexpr int64_t kLanes = 16;  // output rows a vector

// The activations of one call, quantised, in one allocation (a decode step makes ~120 calls).
struct QuantizedRows {
  at::Tensor storage;
  const int8_t* y = nullptr;       // [M, K]
  const float* scale = nullptr;    // [M, K / 32]: sx
  const float* offset = nullptr;   // [M, K / 32]: 8 bits: -128 * sx * sum(y), 4 bits: sum(x)
};

template <typename In>
QuantizedRows quantize_rows(const In* xp, int64_t M, int64_t K, int bits) {
  const int64_t blocks = K / kBlock;
  QuantizedRows q;
  q.storage = at::empty({M * blocks * 2 * 4 + M * K + 64}, at::TensorOptions().dtype(at::kByte));
  float* sp = reinterpret_cast<float*>(q.storage.data_ptr<uint8_t>());
  float* op = sp + M * blocks;
  int8_t* yp = reinterpret_cast<int8_t*>(op + M * blocks);
  q.scale = sp;
  q.offset = op;
  q.y = yp;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t b = 0; b < blocks; ++b) {
        float x[kBlock];
        for (int64_t i = 0; i < kBlock; ++i) x[i] = static_cast<float>(xp[row * K + b * kBlock + i]);
        float amax = 0.f, sum = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) {
          amax = std::max(amax, std::fabs(x[i]));
          sum += x[i];
        }
        const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* y = yp + row * K + b * kBlock;
        int32_t ysum = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(x[i] * inv));
          y[i] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
          ysum += y[i];
        }
        sp[row * blocks + b] = sx;
        op[row * blocks + b] = bits == 8 ? -128.f * sx * static_cast<float>(ysum) : sum;
      }
    }
  });
  return q;
}

inline int64_t group_bytes(int bits) { return bits == 4 ? 256 : 512; }

// The weight q (0..15 or 0..255) of row `lane` of a group, feature `k` of block `b`'s 32.
inline int32_t weight_at(const uint8_t* cell, int bits, int64_t lane, int64_t k) {
  const int64_t chunk = k / 4, j = k % 4;
  if (bits == 8) return cell[chunk * 64 + lane * 4 + j];
  const uint8_t byte = cell[(chunk / 2) * 64 + lane * 4 + j];
  return chunk % 2 == 0 ? (byte & 0xF) : (byte >> 4);
}

template <typename Out>
void store(Out* out, const float* values, const float* bias, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Out>(bias == nullptr ? values[i] : values[i] + bias[i]);
}

// Plain loops: the same quantised arithmetic, for groups [g0, g1).
template <typename Out>
void groups_reference(const QuantizedRows& q, const uint8_t* qs, const at::Half* d, const at::Half* m, int bits,
                      const float* bias, int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1, Out* out) {
  const int64_t blocks = K / kBlock;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = std::min(kLanes, N - g * kLanes);
    for (int64_t a = 0; a < M; ++a) {
      float totals[kLanes] = {};
      for (int64_t lane = 0; lane < rows; ++lane) {
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* cell = qs + (g * blocks + b) * group_bytes(bits);
          int32_t dot = 0;
          for (int64_t k = 0; k < kBlock; ++k) dot += weight_at(cell, bits, lane, k) * q.y[a * K + b * kBlock + k];
          const float db = static_cast<float>(d[(g * blocks + b) * kLanes + lane]);
          const float sx = q.scale[a * blocks + b], off = q.offset[a * blocks + b];
          totals[lane] += bits == 4 ? db * sx * static_cast<float>(dot) +
                                          static_cast<float>(m[(g * blocks + b) * kLanes + lane]) * off
                                    : db * (sx * static_cast<float>(dot) + off);
        }
      }
      store(out + a * N + g * kLanes, totals, bias == nullptr ? nullptr : bias + g * kLanes, rows);
    }
  }
}

#ifdef TM_QUANT_VNNI
constexpr int kActs = 4;            // activation rows that share one unpacking of a block's weights
constexpr int64_t kActChunk = 64;   // activation rows kept hot (L2) while a thread's groups pass
// How far ahead the weight stream is prefetched (a thread's groups are contiguous): 8 KiB was the
// best of 2-32 KiB on the 2-core development machine (python -m tokenmill.benchmarks.kernels.cpu_quant_matmul).
constexpr int64_t kPrefetchBytes = 8192;


template <int BITS>
inline void unpack(const uint8_t* cell, __m512i w[8]) {
  if constexpr (BITS == 8) {
    for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(cell + c * 64);
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(cell + i * 64);
      w[2 * i] = _mm512_and_si512(v, low4);
      w[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
  }
}

// Group g (16 rows) against activation rows [a0, a0 + A).
template <int A, int BITS, typename Out>
inline void tile(const QuantizedRows& q, const uint8_t* qs, const at::Half* d, const at::Half* m, const float* bias,
                 int64_t K, int64_t N, int64_t g, int64_t a0, Out* out) {
  const int64_t blocks = K / kBlock;
  const uint8_t* cells = qs + g * blocks * (BITS == 4 ? 256 : 512);
  const at::Half* dg = d + g * blocks * kLanes;
  const at::Half* mg = BITS == 4 ? m + g * blocks * kLanes : nullptr;
  __m512 acc[A];
  for (int a = 0; a < A; ++a) acc[a] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* cell = cells + b * (BITS == 4 ? 256 : 512);
    for (int64_t p = 0; p < (BITS == 4 ? 256 : 512); p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(cell) + kPrefetchBytes + p, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dg + b * kLanes) + kPrefetchBytes / 8, _MM_HINT_T0);
    if constexpr (BITS == 4) _mm_prefetch(reinterpret_cast<const char*>(mg + b * kLanes) + kPrefetchBytes / 8, _MM_HINT_T0);
    __m512i w[8];
    unpack<BITS>(cell, w);
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dg + b * kLanes)));
    __m512 mv;
    if constexpr (BITS == 4)
      mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mg + b * kLanes)));
    for (int a = 0; a < A; ++a) {
      const int32_t* y = reinterpret_cast<const int32_t*>(q.y + (a0 + a) * K + b * kBlock);
      // Two int32 sums of four chunks each: shorter dependency chains.
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
      for (int c = 0; c < 8; c += 2) {
        even = _mm512_dpbusd_epi32(even, w[c], _mm512_set1_epi32(y[c]));
        odd = _mm512_dpbusd_epi32(odd, w[c + 1], _mm512_set1_epi32(y[c + 1]));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      const int64_t at = (a0 + a) * blocks + b;
      const __m512 f = _mm512_mul_ps(dot, _mm512_set1_ps(q.scale[at]));
      acc[a] = _mm512_fmadd_ps(f, dv, acc[a]);
      // 4 bits: + m * sum(x); 8 bits: + d * (-128 sx sum(y))
      acc[a] = _mm512_fmadd_ps(BITS == 4 ? mv : dv, _mm512_set1_ps(q.offset[at]), acc[a]);
    }
  }
  const int64_t rows = std::min(kLanes, N - g * kLanes);
  for (int a = 0; a < A; ++a) {
    alignas(64) float values[kLanes];
    _mm512_store_ps(values, acc[a]);
    store(out + (a0 + a) * N + g * kLanes, values, bias == nullptr ? nullptr : bias + g * kLanes, rows);
  }
}

template <int BITS, typename Out>
void groups_vnni(const QuantizedRows& q, const uint8_t* qs, const at::Half* d, const at::Half* m, const float* bias,
                 int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1, Out* out) {
  for (int64_t c0 = 0; c0 < M; c0 += kActChunk) {
    const int64_t c1 = std::min(M, c0 + kActChunk);
    for (int64_t g = g0; g < g1; ++g) {
      int64_t a = c0;
      for (; a + kActs <= c1; a += kActs) tile<kActs, BITS>(q, qs, d, m, bias, K, N, g, a, out);
      for (; a + 2 <= c1; a += 2) tile<2, BITS>(q, qs, d, m, bias, K, N, g, a, out);
      for (; a < c1; ++a) tile<1, BITS>(q, qs, d, m, bias, K, N, g, a, out);
    }
  }
}
#endif

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& m,
                        int64_t bits, int64_t N, const c10::optional<at::Tensor>& bias, bool reference = false) {
  TORCH_CHECK(bits == 4 || bits == 8, "cpu_quant_matmul: 4 or 8 bits, got ", bits);
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "cpu_quant_matmul: x [M, K] in bf16 or float32");
  const int64_t M = x.size(0), K = x.size(1), blocks = K / kBlock, groups = (N + kLanes - 1) / kLanes;
  TORCH_CHECK(K % kBlock == 0, "cpu_quant_matmul: K = ", K, " is not a multiple of ", kBlock);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 3 && qs.size(0) == groups &&
                  qs.size(1) == blocks && qs.size(2) == group_bytes(static_cast<int>(bits)),
              "cpu_quant_matmul: qs uint8 [", groups, ", ", blocks, ", ", group_bytes(static_cast<int>(bits)), "]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == groups * blocks * kLanes,
              "cpu_quant_matmul: d fp16 [N / 16, K / 32, 16]");
  const at::Half* mp = nullptr;
  if (bits == 4) {
    TORCH_CHECK(m.has_value() && m->scalar_type() == at::kHalf && m->is_contiguous() &&
                    m->numel() == groups * blocks * kLanes,
                "cpu_quant_matmul: 4 bits need m fp16 [N / 16, K / 32, 16]");
    mp = m->data_ptr<at::Half>();
  }
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "cpu_quant_matmul: bias of ", bias->numel(), " for ", N, " outputs");
    bf = bias->reshape({N}).to(at::kFloat).contiguous();
  }
  const at::Tensor xc = x.contiguous();
  const int b = static_cast<int>(bits);
  const QuantizedRows q = x.scalar_type() == at::kFloat ? quantize_rows(xc.data_ptr<float>(), M, K, b)
                                                        : quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, b);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  auto run = [&](auto* out) {
    // Whole groups per thread: each weight row is read by one thread only.
    at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
#ifdef TM_QUANT_VNNI
      if (!reference) {
        if (b == 4) {
          groups_vnni<4>(q, qp, dp, mp, bp, M, K, N, g0, g1, out);
        } else {
          groups_vnni<8>(q, qp, dp, mp, bp, M, K, N, g0, g1, out);
        }
        return;
      }
#endif
      groups_reference(q, qp, dp, mp, b, bp, M, K, N, g0, g1, out);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(y.data_ptr<float>());
  } else {
    run(y.data_ptr<at::BFloat16>());
  }
  return y;
}

// The plain loops whatever the machine has (for tests of the path machines without VNNI take).
at::Tensor quant_matmul_reference(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                                  const c10::optional<at::Tensor>& m, int64_t bits, int64_t N,
                                  const c10::optional<at::Tensor>& bias) {
  return quant_matmul(x, qs, d, m, bits, N, bias, /*reference=*/true);
}

bool vectorized() {
#ifdef TM_QUANT_VNNI
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("cpu_quant_matmul(Tensor x, Tensor qs, Tensor d, Tensor? m, int bits, int n, Tensor? bias) -> Tensor");
  m.def("cpu_quant_matmul_reference(Tensor x, Tensor qs, Tensor d, Tensor? m, int bits, int n, Tensor? bias) -> Tensor");
  m.def("cpu_quant_matmul_vectorized() -> bool", &vectorized);
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("cpu_quant_matmul", [](const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                                const c10::optional<at::Tensor>& m, int64_t bits, int64_t n,
                                const c10::optional<at::Tensor>& bias) { return quant_matmul(x, qs, d, m, bits, n, bias); });
  m.impl("cpu_quant_matmul_reference", &quant_matmul_reference);
}
