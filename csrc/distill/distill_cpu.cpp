// CPU binding of the distillation kernel op kd_loss_fwd: validates every argument before any work
// (labels in range where cross-entropy reads them), allocates the outputs, picks the instruction
// set at run time and runs blocks of rows with st::parallel_for, each thread with its own fp32
// scratch row. Kernels live in distill_cpu_{scalar,avx2,avx512}.cpp behind distill_cpu.h.
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cpu_features.h"
#include "distill/distill_cpu.h"

namespace bigkernels::distill::cpu {

const Kernels& best_kernels() {
  // Levels as in the other families: scalar 0, avx2 1, avx512 2 (capped by BIGKERNELS_CPU_ISA).
  static const int cpu_level = bigkernels::cpu_has_avx512()          ? 2
                               : bigkernels::cpu_has_avx2_fma_f16c() ? 1
                                                                     : 0;
  switch (std::min(cpu_level, bigkernels::cpu_isa_level_cap())) {
    case 2: return avx512_kernels();
    case 1: return avx2_kernels();
    default: return scalar_kernels();
  }
}

namespace {

constexpr const char* kOp = "kd_loss_fwd";

bool is_float(st::ScalarType t) { return t == st::kFloat || t == st::kHalf || t == st::kBFloat16; }

DType dtype_of(st::ScalarType t) {
  return t == st::kFloat ? DType::f32 : t == st::kBFloat16 ? DType::bf16 : DType::f16;
}

// Rows may be strided; elements within a row must be adjacent (else a contiguous copy).
st::Tensor unit_stride_rows(const st::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : st::contiguous(x);
}

void check_logits(const char* name, const st::Tensor& x) {
  BK_CHECK(x.device().is_cpu(), kOp, ": expected ", name, " on the CPU, got a tensor on ", x.device());
  BK_CHECK(x.dim() == 2, kOp, ": expected 2-D ", name, " [N, V], got ", x.dim(), "-D with shape ", x.sizes());
  BK_CHECK(is_float(x.scalar_type()), kOp, ": expected ", name, " of dtype float32, bfloat16 or float16, got ",
              x.scalar_type());
}

std::tuple<st::Tensor, st::Tensor, st::Tensor> kd_loss_fwd_cpu(
    const st::Tensor& student_in, const st::Tensor& teacher_in, const std::optional<st::Tensor>& labels_in,
    const st::Tensor& grad_scale, double temperature, double alpha, std::optional<int64_t> ignore_index,
    bool grad_student, bool grad_teacher) {
  check_logits("student", student_in);
  check_logits("teacher", teacher_in);
  BK_CHECK(teacher_in.sizes() == student_in.sizes(), kOp, ": teacher logits ", teacher_in.sizes(),
              " must match student logits ", student_in.sizes());
  const int64_t N = student_in.size(0), V = student_in.size(1);
  BK_CHECK(V >= 1, kOp, ": expected a non-empty vocabulary (V >= 1), got V = ", V);
  BK_CHECK(std::isfinite(temperature) && temperature > 0.0, kOp, ": expected temperature > 0, got ", temperature);
  BK_CHECK(alpha >= 0.0 && alpha <= 1.0, kOp, ": expected alpha in [0, 1], got ", alpha);
  BK_CHECK(grad_scale.numel() == 1, kOp, ": expected a one-element grad_scale, got shape ", grad_scale.sizes());
  const bool has_labels = labels_in.has_value();
  BK_CHECK(alpha == 0.0 || has_labels, kOp, ": alpha = ", alpha, " needs labels");
  st::Tensor labels;
  if (has_labels) {
    labels = st::contiguous(*labels_in);
    BK_CHECK(labels.device().is_cpu(), kOp, ": expected labels on the CPU, got ", labels.device());
    BK_CHECK(labels.scalar_type() == st::kLong, kOp, ": expected int64 labels, got ", labels.scalar_type());
    BK_CHECK(labels.dim() == 1 && labels.size(0) == N, kOp, ": expected labels of shape [", N, "], got ",
                labels.sizes());
    if (alpha > 0.0) {
      const int64_t* l = labels.mutable_data_ptr<int64_t>();
      for (int64_t r = 0; r < N; ++r) {
        if (ignore_index.has_value() && l[r] == *ignore_index) continue;
        BK_CHECK(l[r] >= 0 && l[r] < V, kOp, ": label ", l[r], " at row ", r, " is outside [0, ", V,
                    ") (the vocabulary)", ignore_index.has_value() ? " and is not ignore_index" : "");
      }
    }
  }
  const st::Tensor student = unit_stride_rows(student_in), teacher = unit_stride_rows(teacher_in);
  st::Tensor loss = st::empty({N}, st::options(student).dtype(st::kFloat));
  st::Tensor gs = st::empty(grad_student ? st::IntArrayRef({N, V}) : st::IntArrayRef({0}), st::options(student));
  st::Tensor gt = st::empty(grad_teacher ? st::IntArrayRef({N, V}) : st::IntArrayRef({0}), st::options(teacher));

  KdArgs a{};
  a.s = student.data_ptr();
  a.t = teacher.data_ptr();
  a.s_dtype = dtype_of(student.scalar_type());
  a.t_dtype = dtype_of(teacher.scalar_type());
  a.s_stride = student.stride(0);
  a.t_stride = teacher.stride(0);
  a.V = V;
  a.labels = has_labels ? labels.mutable_data_ptr<int64_t>() : nullptr;
  a.has_ignore = ignore_index.has_value();
  a.ignore_index = ignore_index.value_or(0);
  a.temperature = float(temperature);
  a.inv_temperature = float(1.0 / temperature);
  a.alpha = float(alpha);
  a.grad_scale = st::to(grad_scale, st::kFloat).mutable_data_ptr<float>()[0];
  a.loss = loss.mutable_data_ptr<float>();
  a.gs = grad_student ? gs.data_ptr() : nullptr;
  a.gt = grad_teacher ? gt.data_ptr() : nullptr;

  const Kernels& k = best_kernels();
  const bool grad = grad_student || grad_teacher;
  // rows are independent; a block of rows per task, at least ~32K logits of work each
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / V);
  st::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(grad ? size_t(3 * V) : 0);
    k.kd_rows(a, r0, r1, scratch.data());
  });
  return {loss, gs, gt};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) { m.impl("kd_loss_fwd", TORCH_BOX(&kd_loss_fwd_cpu)); }

}  // namespace bigkernels::distill::cpu
