// Pointer-level interface of the CPU sparse linear kernels (no torch headers): one instance per
// instruction set, chosen at run time by the binding in sparse_cpu.cpp. Every kernel computes
// out [M, N] = x [M, K] . W^T + bias for a block of output features [n0, n1) and rows [m0, m1);
// the binding validates everything except what is noted, splits the work and runs it in parallel.
#pragma once

#include <cstdint>

namespace bigkernels::sparse::cpu {

enum class DType { f32, f16, bf16 };

struct SparseArgs {
  const float* x;     // fp32 [M, K], row stride K (the binding converts x once)
  const float* xt;    // CSR, M >= kCsrTransposeM: x in column chunks (see csr_rows), else null;
                      // 2:4, M > 1 (else null): x fp32 packed: groups of PR = kSparse24PackRows rows (zero rows past M),
                      // each [ceil(K / PK)][PR][PK] + kSparse24PackPad, PK = kSparse24PackK (zero
                      // inputs past K), so a tile's rows of x are one contiguous read per step;
                      // 2:4 on sparse24_permil (AVX2, any M below the lanes' minimum): the rows
                      // quad-swapped instead (see Kernels::sparse24_permil)
  int64_t M, K, N;
  const int64_t* crow;  // CSR: [N+1]; BSR: [N/B+1] (validated monotonic, crow[0] = 0, crow[-1] = nnz)
  const int32_t* col;   // CSR: [nnz] (range checked in the kernel: see bad_col); BSR: [nnzb] (validated)
  const void* w;        // values (CSR [nnz], 2:4 [N, K/2]) or blocks [nnzb, B, B]
  DType w_dtype;
  const uint8_t* meta;  // 2:4: [N, K/4]
  int64_t B;            // BSR block size
  const float* bias;    // fp32 [N] or null
  void* out;            // [M, N], row stride N
  DType out_dtype;
  float* scratch;       // BSR, M >= kBsrTransposeM: one thread's buffer of crow-row-max * B * B floats
  const float* a_packed;  // the engines' packed x (see Kernels: *_panels, sparse24_lanes), else null
};

// x chunk width used by csr_rows for M >= kCsrTransposeM: xt holds ceil(M / chunk) chunks, each
// [K][chunk] fp32 (rows beyond M zero). chunk = csr_chunk(M) of the chosen instance.
struct Kernels {
  const char* isa;
  int lanes;  // fp32 lanes of one vector
  int64_t (*csr_chunk)(int64_t M);
  // Returns the number of col entries outside [0, K) met (they read nothing and add nothing).
  int64_t (*csr_rows)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // Block rows [r0, r1) (outputs r0*B .. r1*B).
  void (*bsr_rows)(const SparseArgs&, int64_t m0, int64_t m1, int64_t r0, int64_t r1);
  void (*sparse24_rows)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // AVX2 engines (null where the instruction set has none; the kernels above then run):
  // bsr_panels / csr_panels: the panel engine of common/cpu_gemm_avx2.h on a.a_packed (x packed by
  //   pack_a_f32: row panels [p0, p1) of kPanelRows rows); blocks start at rows that are multiples
  //   of kPanelRows and columns that are multiples of kPanelCols. csr_panels returns the number of
  //   col entries it left out: not increasing along their row, or outside [0, K) (csr_rows then
  //   has to run: it takes any order and reports the latter).
  // sparse24_lanes: rows of x along the vector lanes: a.a_packed holds x in row groups of
  //   lane_rows(M) rows, each [K][rows] fp32 (zero rows past M); blocks start at multiples of it.
  void (*pack_a_f32)(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst);
  void (*bsr_panels)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  int64_t (*csr_panels)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*sparse24_lanes)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // sparse24_permil: fewer rows (below the lanes' minimum): a.xt holds each row of x, K / 16 * 16
  //   floats, with inputs 4-7 and 8-11 of every 16 swapped (the tail past them read from a.x).
  void (*sparse24_permil)(const SparseArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // sparse24_to_dense_f32: rows [n0, n1) of the dense [N, K] weight of fp32 2:4 values / meta.
  void (*sparse24_to_dense_f32)(const float* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t n1,
                                float* out);
};

constexpr int64_t kPanelRows = 6, kPanelCols = 16;
inline int64_t packed_a_floats(int64_t M, int64_t K) { return (M + kPanelRows - 1) / kPanelRows * kPanelRows * K; }
// sparse24_lanes' row groups: 16 rows (two 8-lane vectors) for small batches, 32 from 32 rows
inline int64_t lane_rows(int64_t M) { return M >= 32 ? 32 : 16; }

// M at which CSR switches from gathers to x chunks (measured, Zen 3, two threads, µs, gathers vs
// chunks at 3 rows: 1024^2 50 / 70 / 90% sparse 364-436 / 260-265 / 100-116 vs 320 / 212-217 /
// 101-151; 4096^2 10051 / 5415 / 1589 vs 5835 / 5620 / 1021; at 2 rows the gathers win)
constexpr int64_t kCsrTransposeM = 3;
// M at which BSR switches from dot products to broadcasts on a transposed block row (its scalar
// transposition costs a whole weight's worth of strided stores per call). Measured (Zen 3, two
// threads, 50% of 64 x 64 blocks, µs, broadcasts vs dot products): 1024^2 M = 4 / 8 / 16 / 64:
// 308 / 378 / 476 / 1284 vs 85 / 147 / 272 / 1005; 16 x 16 blocks M = 4 / 16: 438 / 651 vs
// 155 / 363; 4096^2 M = 4 / 16 / 64: 5932 / 8594 / 19002 vs 4370 / 8775 / 28317; the scalar
// instance about even up to 16. AVX2 runs its panel engine from 16 rows anyway.
constexpr int64_t kBsrTransposeM = 16;
// 2:4: x packed in groups of kSparse24PackRows rows, each [ceil(K / PK)][rows][PK] plus
// kSparse24PackPad floats (groups off 4 KB alignment; see xt); kSparse24PackedX: the most floats
// of packed x a block of rows may take (its rows of x stay in L2 while the weights stream past)
constexpr int64_t kSparse24PackRows = 4, kSparse24PackK = 32, kSparse24PackPad = 2064;
constexpr int64_t kSparse24PackedX = 256 << 10;

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();    // AVX2 + FMA + F16C
const Kernels& avx512_kernels();  // AVX-512 F/BW/VL/DQ
// The widest the CPU has, capped by BIGKERNELS_CPU_ISA=scalar|avx2|avx512.
const Kernels& best_kernels();

}  // namespace bigkernels::sparse::cpu
