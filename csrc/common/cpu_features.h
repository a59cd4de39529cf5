// Run-time CPU feature checks for choosing a kernel's instruction set. __builtin_cpu_supports
// also checks that the OS saves the AVX / AVX-512 register state (XCR0).
#pragma once

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

}  // namespace bigkernels
