// Run-time CPU feature checks for choosing a kernel's instruction set. __builtin_cpu_supports
// also checks that the OS saves the AVX / AVX-512 register state (XCR0).
#pragma once

#include <cstdlib>
#include <cstring>

namespace bigkernels {

// AVX2 + FMA + F16C: what the *_avx2.cpp kernel units are compiled for.
inline bool cpu_has_avx2_fma_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C): what the *_avx512.cpp kernel units are compiled for.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The above plus AVX512_BF16 (vcvtneps2bf16): the *_avx512bf16.cpp units.
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AVX-512 (as cpu_has_avx512) plus AVX512_VNNI (vpdpbusd on zmm): the *_avx512vnni.cpp units.
inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The cap BIGKERNELS_CPU_ISA puts on a kernel family's instruction-set level, read on every call:
// scalar 0, avx2 1, avx512 2, avx512_bf16 3; unset or unknown: no cap (returns 1 << 30).
// A family takes min(its CPU's best level, this), so a level the CPU lacks falls to one below.
inline int cpu_isa_level_cap() {
  const char* forced = std::getenv("BIGKERNELS_CPU_ISA");
  if (forced == nullptr) return 1 << 30;
  static const char* const names[] = {"scalar", "avx2", "avx512", "avx512_bf16"};
  for (int l = 0; l < 4; ++l)
    if (std::strcmp(forced, names[l]) == 0) return l;
  return 1 << 30;
}

}  // namespace bigkernels
