// Run-time CPU feature checks for choosing a kernel's instruction set.
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

}  // namespace bigkernels
