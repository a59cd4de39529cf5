// CPU binding of the int8 quantisation ops: validates every argument before any work, picks the
// instruction set at run time and splits the output into blocks run with st::parallel_for.
// Kernels live in quant_cpu_{scalar,avx2,avx512vnni}.cpp behind the pointer-level quant_cpu.h.
#include "common/stable.h"

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "quant/quant_cpu.h"

namespace bigkernels::quant::cpu {

const Kernels& best_kernels() {
  // Levels as in optim_cpu.cpp's best_kernels (scalar 0, avx2 1, avx512 2); here level 2 also
  // needs AVX512_VNNI. The CPU's level is found once, the BIGKERNELS_CPU_ISA cap on every call.
  static const int cpu_level = bigkernels::cpu_has_avx512_vnni()     ? 2
                               : bigkernels::cpu_has_avx2_fma_f16c() ? 1
                                                                     : 0;
  switch (std::min(cpu_level, bigkernels::cpu_isa_level_cap())) {
    case 2: return avx512vnni_kernels();
    case 1: return avx2_kernels();
    default: return scalar_kernels();
  }
}

namespace {

DType float_dtype(const st::Tensor& t) {
  switch (t.scalar_type()) {
    case st::kFloat: return DType::f32;
    case st::kHalf: return DType::f16;
    case st::kBFloat16: return DType::bf16;
    default: return DType::i32;
  }
}

bool is_float(st::ScalarType t) { return t == st::kFloat || t == st::kHalf || t == st::kBFloat16; }

void check_cpu(const char* op, const char* name, const st::Tensor& t) {
  BK_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got a tensor on ", t.device());
}

void check_matrix(const char* op, const char* name, const st::Tensor& t, bool want_int8) {
  check_cpu(op, name, t);
  BK_CHECK(t.dim() == 2, op, ": expected ", name, " to be 2-D, got ", t.dim(), "-D with shape ", t.sizes());
  if (want_int8) {
    BK_CHECK(t.scalar_type() == st::kChar, op, ": expected ", name, " of dtype torch.int8, got ",
                t.scalar_type());
  } else {
    BK_CHECK(is_float(t.scalar_type()), op, ": expected ", name,
                " of dtype float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A 1-D floating vector of n elements (scales, bias).
void check_vector(const char* op, const char* name, const st::Tensor& t, int64_t n, const char* what) {
  check_cpu(op, name, t);
  BK_CHECK(is_float(t.scalar_type()), op, ": expected ", name, " of dtype float32, bfloat16 or float16, got ",
              t.scalar_type());
  BK_CHECK(t.dim() == 1 && t.size(0) == n, op, ": expected ", name, " of shape [", n, "] (", what,
              "), got shape ", t.sizes());
}

// Row-major with unit stride along K (a row stride is fine); otherwise a contiguous copy.
st::Tensor rows_unit_stride(const st::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= std::max<int64_t>(t.size(1), 1) ? t
                                                                                               : st::contiguous(t);
}

st::Tensor as_f32(const st::Tensor& t) { return st::contiguous(st::to(t, st::kFloat)); }

// Splits out [M, N] into blocks and runs fn(m0, m1, n0, n1) on them in parallel. A block holds
// up to 256 rows of a and ~256 KiB of b (nb rows of b_row_bytes each), so those b rows stay in L2
// while the kernel's row tiles pass over them; blocks shrink (columns first: M = 1 splits N) until
// every thread gets about four; small products run on fewer threads (bigkernels::threads_for).
template <class Fn>
void for_each_block(int64_t M, int64_t N, int64_t b_row_bytes, const Fn& fn) {
  if (M == 0 || N == 0) return;
  constexpr int64_t kRowsPerBlock = 256, kBBlockBytes = 256 << 10, kN = 6, kM = 4;  // kN, kM: tile sizes
  const int64_t want = 4 * int64_t(st::get_num_threads());
  int64_t nb = std::max<int64_t>(kN, kBBlockBytes / std::max<int64_t>(b_row_bytes, 1) / kN * kN);
  int64_t mb = std::min<int64_t>(M, kRowsPerBlock);
  auto blocks = [&] { return ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  while (blocks() < want && nb > kN) nb = std::max<int64_t>(kN, nb / 2 / kN * kN);
  while (blocks() < want && mb > kM) mb = std::max<int64_t>(kM, mb / 2 / kM * kM);
  const int64_t mblocks = (M + mb - 1) / mb;
  // Consecutive blocks share their b rows (column-block major), so a thread reuses them in L2.
  st::parallel_for(0, blocks(), bigkernels::grain_for(blocks(), double(M) * double(N) * double(b_row_bytes)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t mi = blk % mblocks, ni = blk / mblocks;
      fn(mi * mb, std::min(M, (mi + 1) * mb), ni * nb, std::min(N, (ni + 1) * nb));
    }
  });
}

// The panel engine from this many rows of a (where the instruction set has one): with fewer, the
// tiles above, which stream each weight row once and need no packing, are as fast or faster.
constexpr int64_t kInt8PanelMinRows = 16, kW8a16PanelMinRows = 32;

int64_t panel_min_rows(int64_t dflt) {  // BIGKERNELS_PANEL_MIN_ROWS overrides (tuning)
  const char* v = std::getenv("BIGKERNELS_PANEL_MIN_ROWS");
  return v ? std::atoll(v) : dflt;
}

// The panel engine's blocks of out [M, N]: up to 264 rows (their packed a stays in L2 next to the
// block's sums) by 128 columns.
template <class Fn>
void for_each_panel_block(int64_t M, int64_t N, int64_t K, const Fn& fn) {
  bigkernels::for_each_engine_block(M, N, kPanelRows, 264, kPanelCols, 128, double(M) * double(N) * double(K), fn);
}

// a [M, K] packed for the panel engine by pack(p0, p1) over row panels, in parallel.
template <class Pack>
void pack_panels(int64_t M, int64_t K, const Pack& pack) {
  const int64_t panels = (M + kPanelRows - 1) / kPanelRows;
  st::parallel_for(0, panels, bigkernels::grain_for(panels, 4.0 * double(M) * double(K)),
                   [&](int64_t p0, int64_t p1) { pack(p0, p1); });
}

std::tuple<st::Tensor, st::Tensor> quantize_per_token_cpu(const st::Tensor& x_in) {
  const char* op = "quantize_per_token";
  check_matrix(op, "x", x_in, /*want_int8=*/false);
  const st::Tensor x = rows_unit_stride(x_in);
  const int64_t M = x.size(0), K = x.size(1);
  st::Tensor q = st::empty({M, K}, st::options(x).dtype(st::kChar));
  st::Tensor scale = st::empty({M}, st::options(x).dtype(st::kFloat));
  if (M == 0) return {q, scale};
  const Kernels& k = best_kernels();
  const DType dt = float_dtype(x);
  const void* xp = x.data_ptr();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  const int64_t ldx = x.stride(0);
  st::parallel_for(0, M, bigkernels::grain_for(M, 4.0 * double(M) * double(K)), [&](int64_t r0, int64_t r1) {
    k.quantize_rows(dt, xp, ldx, K, r0, r1, qp, sp);
  });
  return {q, scale};
}

void check_ab(const char* op, const st::Tensor& a, const st::Tensor& b, const char* a_name, bool a_int8) {
  check_matrix(op, a_name, a, a_int8);
  check_matrix(op, a_int8 ? "b" : "w_int8", b, /*want_int8=*/true);
  BK_CHECK(a.size(1) == b.size(1), op, ": expected ", a_name, " [M, K] and ", a_int8 ? "b" : "w_int8",
              " [N, K] with the same K, got ", a.sizes(), " and ", b.sizes());
}

st::Tensor int8_gemm(const st::Tensor& a_in, const st::Tensor& b_in, const float* a_scale, const float* b_scale,
                     const float* bias, st::ScalarType out_dtype) {
  const st::Tensor a = rows_unit_stride(a_in), b = rows_unit_stride(b_in);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  st::Tensor out = st::empty({M, N}, st::options(a).dtype(out_dtype));
  GemmArgs g{a.data_ptr(), a.stride(0), b.mutable_data_ptr<int8_t>(), b.stride(0), K, out.data_ptr(), N,
             out_dtype == st::kInt ? DType::i32 : float_dtype(out), a_scale, b_scale, bias, nullptr};
  const Kernels& k = best_kernels();
  if (k.int8_panels && M >= panel_min_rows(kInt8PanelMinRows)) {
    st::Tensor ap = st::empty({packed_a_i8_pairs(M, K)}, st::options(a).dtype(st::kInt));
    int32_t* app = ap.mutable_data_ptr<int32_t>();
    const int8_t* av = a.mutable_data_ptr<int8_t>();
    pack_panels(M, K, [&](int64_t p0, int64_t p1) { k.pack_a_i8(av, a.stride(0), M, K, p0, p1, app); });
    g.a_packed = app;
    for_each_panel_block(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.int8_panels(g, m0, m1, n0, n1); });
    return out;
  }
  for_each_block(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.int8_gemm(g, m0, m1, n0, n1); });
  return out;
}

st::Tensor int8_mm_cpu(const st::Tensor& a, const st::Tensor& b) {
  check_ab("int8_mm", a, b, "a", true);
  return int8_gemm(a, b, nullptr, nullptr, nullptr, st::kInt);
}

st::Tensor int8_scaled_mm_cpu(const st::Tensor& a, const st::Tensor& a_scale, const st::Tensor& b,
                              const st::Tensor& b_scale, const std::optional<st::Tensor>& bias,
                              st::ScalarType out_dtype) {
  const char* op = "int8_scaled_mm";
  check_ab(op, a, b, "a", true);
  check_vector(op, "a_scale", a_scale, a.size(0), "one per row of a");
  check_vector(op, "b_scale", b_scale, b.size(0), "one per row of b");
  if (bias.has_value()) check_vector(op, "bias", *bias, b.size(0), "one per row of b");
  BK_CHECK(is_float(out_dtype), op, ": expected out_dtype float32, bfloat16 or float16, got ", out_dtype);
  const st::Tensor as = as_f32(a_scale), bs = as_f32(b_scale);
  const std::optional<st::Tensor> bi = bias.has_value() ? std::optional<st::Tensor>(as_f32(*bias)) : std::nullopt;
  return int8_gemm(a, b, as.mutable_data_ptr<float>(), bs.mutable_data_ptr<float>(), bi ? bi->mutable_data_ptr<float>() : nullptr,
                   out_dtype);
}

st::Tensor w8a16_mm_cpu(const st::Tensor& x_in, const st::Tensor& w_in, const st::Tensor& w_scale,
                        const std::optional<st::Tensor>& bias) {
  const char* op = "w8a16_mm";
  check_ab(op, x_in, w_in, "x", false);
  check_vector(op, "w_scale", w_scale, w_in.size(0), "one per row of w_int8");
  if (bias.has_value()) check_vector(op, "bias", *bias, w_in.size(0), "one per row of w_int8");
  const st::Tensor w = rows_unit_stride(w_in), ws = as_f32(w_scale);
  const std::optional<st::Tensor> bi = bias.has_value() ? std::optional<st::Tensor>(as_f32(*bias)) : std::nullopt;
  const int64_t M = x_in.size(0), N = w.size(0), K = x_in.size(1);
  st::Tensor out = st::empty({M, N}, st::options(x_in));
  GemmArgs g{nullptr, 0, w.mutable_data_ptr<int8_t>(), w.stride(0), K, out.data_ptr(), N, float_dtype(out),
             nullptr, ws.mutable_data_ptr<float>(), bi ? bi->mutable_data_ptr<float>() : nullptr, nullptr};
  const Kernels& k = best_kernels();
  if (k.w8a16_panels && M >= panel_min_rows(kW8a16PanelMinRows)) {  // x packed from its own dtype
    const st::Tensor x = rows_unit_stride(x_in);
    st::Tensor ap = st::empty({packed_a_f32_floats(M, K)}, st::options(x).dtype(st::kFloat));
    float* app = ap.mutable_data_ptr<float>();
    const DType dt = float_dtype(x);
    pack_panels(M, K, [&](int64_t p0, int64_t p1) { k.pack_a_f32(dt, x.data_ptr(), x.stride(0), M, K, p0, p1, app); });
    g.a_packed = app;
    for_each_panel_block(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.w8a16_panels(g, m0, m1, n0, n1); });
    return out;
  }
  const st::Tensor x = x_in.scalar_type() == st::kFloat ? rows_unit_stride(x_in) : as_f32(x_in);
  g.a = x.data_ptr();
  g.lda = x.stride(0);
  for_each_block(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.w8a16_gemm(g, m0, m1, n0, n1); });
  return out;
}

// F.linear(x, weight, bias) for small batches: the w8a16 tiles with a float weight (each weight
// row streamed once per tile of tile_rows rows of x: 2 on AVX2, 4 on AVX-512; blocks on every
// thread), fp32 sums. x, weight and
// bias share one float dtype, as F.linear wants; a 16-bit x is widened to fp32 first.
st::Tensor dense_mm_cpu(const st::Tensor& x_in, const st::Tensor& w_in, const std::optional<st::Tensor>& bias) {
  const char* op = "dense_mm";
  check_matrix(op, "x", x_in, /*want_int8=*/false);
  check_matrix(op, "weight", w_in, /*want_int8=*/false);
  BK_CHECK(x_in.size(1) == w_in.size(1), op, ": expected x [M, K] and weight [N, K] with the same K, got ",
           x_in.sizes(), " and ", w_in.sizes());
  BK_CHECK(x_in.scalar_type() == w_in.scalar_type(), op, ": expected x and weight of the same dtype, got ",
           x_in.scalar_type(), " and ", w_in.scalar_type());
  if (bias.has_value()) {
    check_vector(op, "bias", *bias, w_in.size(0), "one per row of weight");
    BK_CHECK(bias->scalar_type() == x_in.scalar_type(), op, ": expected bias of x's dtype ", x_in.scalar_type(),
             ", got ", bias->scalar_type());
  }
  const st::Tensor w = rows_unit_stride(w_in);
  const st::Tensor x = x_in.scalar_type() == st::kFloat ? rows_unit_stride(x_in) : as_f32(x_in);
  const std::optional<st::Tensor> bi = bias.has_value() ? std::optional<st::Tensor>(as_f32(*bias)) : std::nullopt;
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  st::Tensor out = st::empty({M, N}, st::options(x_in));
  GemmArgs g{x.data_ptr(), x.stride(0), nullptr, w.stride(0), K, out.data_ptr(), N, float_dtype(out),
             nullptr, nullptr, bi ? bi->mutable_data_ptr<float>() : nullptr, nullptr, w.data_ptr(), float_dtype(w)};
  const Kernels& k = best_kernels();
  for_each_block(M, N, K * int64_t(w.element_size()),
                 [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.dense_gemm(g, m0, m1, n0, n1); });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("quantize_per_token", TORCH_BOX(&quantize_per_token_cpu));
  m.impl("int8_mm", TORCH_BOX(&int8_mm_cpu));
  m.impl("int8_scaled_mm", TORCH_BOX(&int8_scaled_mm_cpu));
  m.impl("w8a16_mm", TORCH_BOX(&w8a16_mm_cpu));
  m.impl("dense_mm", TORCH_BOX(&dense_mm_cpu));
}

}  // namespace bigkernels::quant::cpu
