// Pointer-level interface of the CPU knowledge-distillation kernel (no torch headers): one
// instance per instruction set, chosen at run time by the binding in distill_cpu.cpp.
//
// kd_rows computes, for rows [r0, r1) of student / teacher logits [N, V] (fp32, fp16 or bf16,
// each its own dtype), the per-row loss and, when asked, the gradients already multiplied by
// grad_scale — one pass for the maxima, one for the exponentials and sums, one that writes the
// gradients (the row's exponentials are kept in the caller's fp32 scratch between the last two,
// so the row is exponentiated once, not twice). Definitions: bigkernels/reference/distill.py.
#pragma once

#include <cstdint>

namespace bigkernels::distill::cpu {

enum class DType { f32, f16, bf16 };

struct KdArgs {
  const void* s;       // student logits, row r at s + r * s_stride (elements; unit stride within a row)
  const void* t;       // teacher logits, same layout rules
  DType s_dtype, t_dtype;
  int64_t s_stride, t_stride;
  int64_t V;           // vocabulary (row length), >= 1
  const int64_t* labels;  // [N] or null; with alpha > 0 every counted label is in [0, V) (the binding checks)
  bool has_ignore;        // rows whose label == ignore_index: loss 0, zero gradient rows
  int64_t ignore_index;
  float temperature, inv_temperature, alpha, grad_scale;
  float* loss;  // [N] fp32
  void* gs;     // [N, V] contiguous, student dtype, or null (no student gradient)
  void* gt;     // [N, V] contiguous, teacher dtype, or null
};

struct Kernels {
  const char* isa;
  // scratch: 3 * V floats owned by the calling thread (used only when a gradient is asked)
  void (*kd_rows)(const KdArgs&, int64_t r0, int64_t r1, float* scratch);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();    // AVX2 + FMA + F16C
const Kernels& avx512_kernels();  // AVX-512 F/BW/VL/DQ
// The widest the CPU has, capped by BIGKERNELS_CPU_ISA=scalar|avx2|avx512.
const Kernels& best_kernels();

}  // namespace bigkernels::distill::cpu
