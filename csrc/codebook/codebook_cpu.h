// Pointer-level interface of the CPU codebook (weight-sharing) kernels (no torch headers): one
// instance per instruction set, chosen at run time by the binding in codebook_cpu.cpp. Each entry
// works on a block of rows; the binding validates the tensors, splits the work and runs the
// blocks in parallel.
//
// Format (bigkernels/reference/codebook.py): a weight W [N, K] is `indices` [N, P] uint8, row n a
// little-endian bit stream with the `bits`-bit index of W[n, k] at stream bits [bits*k, bits*(k+1))
// (P = ceil(K/2) for 4 bits, ceil(K/4) for 2, K for 8, 3*ceil(K/8) for 3: eight indices in three
// bytes), and `table` [G, 2**bits] fp32: W[n, k] = table[n / group_size][index(n, k)].
#pragma once

#include <cstdint>

namespace bigkernels::codebook::cpu {

enum class DType { f32, f16, bf16 };

struct Format {
  const uint8_t* idx;  // packed indices, row stride ldi bytes
  int64_t ldi;
  const float* table;  // fp32 centroids [G, 2**bits], contiguous
  int64_t group_size;  // rows per codebook
  int bits;            // 2, 3, 4 or 8
  int64_t K;           // in_features
};

// out[m, n] = sum_k x[m, k] * W[n, k] + bias[n] for m in [m0, m1), n in [n0, n1): x fp32 [M, K]
// (row stride ldx, K contiguous), fp32 accumulation, stored as out_dtype (row stride ldo).
struct GemmArgs {
  Format w;
  const float* x;
  int64_t ldx;
  // x rows in the instruction set's 4-bit lookup order (Kernels::permute_x), row stride K / 64 * 64,
  // or null: then the kernel permutes each block's rows itself.
  const float* xp;
  const float* bias;  // may be null
  void* out;
  int64_t ldo;
  DType out_dtype;
  // The panel engine's packed x (Kernels::pack_x; engine_gemm only), else null.
  const float* a_packed = nullptr;
};

// The panel engine (AVX2): x is packed once per call in panels of kPanelRows rows ([K][kPanelRows]
// fp32 per panel); blocks of the output then start at rows that are multiples of kPanelRows and
// columns multiples of kPanelCols.
constexpr int64_t kPanelRows = 6, kPanelCols = 16;
inline int64_t packed_x_floats(int64_t M, int64_t K) { return (M + kPanelRows - 1) / kPanelRows * kPanelRows * K; }

struct Kernels {
  const char* isa;
  // The lookup-table GEMM/GEMV on one block (indices decoded and looked up in registers).
  void (*lut_gemm)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // Rows [n0, n1) of the dense W, stored as out_dtype into out (row stride ldo).
  void (*dequantize_rows)(const Format&, int64_t n0, int64_t n1, void* out, int64_t ldo, DType out_dtype);
  // Null, or: the rows [m0, m1) of x (fp32, row stride ldx, K columns) rearranged into xp (row
  // stride K / 64 * 64) in the order the instruction set's 4-bit lookup produces weights, for
  // GemmArgs::xp (the binding calls it once per call, where blocks would each redo it).
  void (*permute_x)(const float* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, float* xp);
  // The 4-bit lookup path runs (and wants xp) for blocks of fewer rows of x than this.
  int64_t permute_rows;
  // The panel engine; null where the instruction set has none (lut_gemm then runs at every M).
  // pack_x: row panels [p0, p1) of x [M, K] (row stride ldx) into dst; engine_gemm: a block of the
  // output from GemmArgs::a_packed (m0 a multiple of kPanelRows, n0 of kPanelCols; ldo = N).
  void (*pack_x)(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst);
  void (*engine_gemm)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // The engine runs from this many rows of x (by bit width: index bits 2, 3, 4, 8).
  int64_t (*engine_min_rows)(int bits);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();  // AVX2 + FMA + F16C: vpermps / vpshufb table lookups in registers
// The widest the CPU has; BIGKERNELS_CPU_ISA=scalar|avx2 caps it (there is no AVX-512 variant:
// an AVX-512 CPU runs the AVX2 kernels).
const Kernels& best_kernels();

// ISA-independent row kernels (codebook_cpu_encode.cpp).
// Indices of rows [n0, n1) of w (fp32, row stride ldw): index = number of the group's midpoints
// mids[g][j] = (table[g][j] + table[g][j+1]) / 2 (fp32, table sorted ascending) strictly below
// w[n, k], i.e. the nearest centroid; packed into f.idx (writable, rows zero-padded).
void encode_rows(const Format& f, const float* mids, const float* w, int64_t ldw, int64_t n0, int64_t n1,
                 uint8_t* idx_out);
// Partial sums for the centroid gradient over rows [n0, n1) of grad_w (fp32, row stride ldg),
// rows of one codebook: acc[c] += sum of grad_w[n, k] over the weights with index c (acc: C
// doubles).
void centroid_sums(const Format& f, const float* grad_w, int64_t ldg, int64_t n0, int64_t n1, double* acc);

}  // namespace bigkernels::codebook::cpu
