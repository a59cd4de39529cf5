// Pointer-level interface of the CPU AdamW8bit kernels (no torch headers): one instance per
// instruction set (scalar, AVX2, AVX-512), chosen at run time by the binding in adamw8bit_cpu.cpp.
// The codes, scales and rounding are defined in bigkernels/reference/optim.py (AdamW8bit section);
// the constants below must equal the ones there (tests compare codes bit for bit).
#pragma once

#include <cstdint>

#include "optim/optim_cpu.h"

namespace bigkernels::optim::cpu8 {

using bigkernels::optim::cpu::DType;

// exp_avg: sign bit + a 7-bit magnitude code with kExpAvgMant mantissa bits over kExpAvgBinades
// binades below 1.0; exp_avg_sq: its square root as an 8-bit code with kSqrtMant / kSqrtBinades.
constexpr int kExpAvgMant = 3, kExpAvgBinades = 15;
constexpr int kSqrtMant = 4, kSqrtBinades = 15;
constexpr int kMinBlock = 64, kMaxBlock = 4096;  // block_size: a power of two in this range

// fp32 bits of 2^-binades: the smallest non-zero magnitude of a code.
constexpr int32_t min_bits(int binades) { return (127 - binades) << 23; }

// Per-tensor scalars of one step, all fp32; differences such as 1 - beta1 taken in double by the
// binding (as for the other Adam ops).
struct Adam8Args {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float decay;         // 1 - lr * weight_decay
  float grad_mult;     // 1/grad_scale * clip coefficient, negated when maximize
  float step_size;     // lr / (1 - beta1^step)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
  bool weight_decay;   // weight_decay != 0
};

// Whole blocks [0, n) of one tensor starting at a block boundary: p, g and keep (or nullptr) at
// element 0 of the range, codes likewise, scales at the range's first block.
struct Kernels {
  const char* isa;
  void (*step)(DType, void* p, const void* g, uint8_t* m_codes, uint8_t* r_codes, float* m_scales,
               float* r_scales, const uint8_t* keep, int64_t n, int64_t block_size, const Adam8Args&);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();
// The widest the CPU has (AVX-512 F/BW/VL/DQ, AVX2+FMA+F16C, scalar), capped by BIGKERNELS_CPU_ISA.
const Kernels& best_kernels();

}  // namespace bigkernels::optim::cpu8
