// AVX512-BF16 for the C++ CPU kernels (cpu_paged_decode.cpp, cpu_flash_prefill.cpp, cpu_gemv.cpp):
// the build's ISA flags (inductor's pick) need not include the bf16 instructions (its AVX-512 ISA
// for Zen 4 does not), so the functions that use them are compiled for them one by one and called
// only where the CPU reports them. Also the per-thread scratch the kernels share.
#pragma once

#include <cstdint>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#define TOKENMILL_BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))

namespace tokenmill_cpu {

// Whether this CPU runs `vdpbf16ps` and `vcvtne2ps2bf16` (asked once).
inline bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace tokenmill_cpu
#endif

namespace tokenmill_cpu {

// `buffer` grown to at least `size` elements: a thread_local buffer passed here lives as long as its
// thread, so a kernel called once per layer and step allocates nothing once grown.
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

}  // namespace tokenmill_cpu
