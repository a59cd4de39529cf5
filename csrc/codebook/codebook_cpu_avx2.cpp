// AVX2 + FMA + F16C instance of the CPU codebook kernels. Eight indices become eight fp32 weights
// in registers: one 32-bit broadcast load of the packed bytes, a per-lane variable shift
// (vpsrlvd) that brings index i to the low bits of lane i, and an 8-entry table lookup across
// the register (vpermps, which reads only the low 3 bits of each lane). 16 entries (4 bits) look
// up both halves of the table and pick one by bit 3 of the index, shifted into the sign bit
// (vpsllvd + vblendvps); 4 entries (2 bits) use a table repeated twice, so bit 2 is don't-care.
// 256 entries (8 bits) use scalar loads from the table in L1. The pragma must precede every
// include; codebook_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <cstring>
#include <vector>

#include "codebook/codebook_cpu.h"
#include "common/cpu_vec_avx2.h"

namespace {
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}

template <int BITS>
struct Avx2Dec;

template <>
struct Avx2Dec<4> {  // two indices per byte, index 2j in the low nibble
  __m256 lo, hi;
  __m256i down, up;
  explicit Avx2Dec(const float* t)
      : lo(_mm256_loadu_ps(t)), hi(_mm256_loadu_ps(t + 8)), down(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        up(_mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0)) {}
  Vec8 load(const uint8_t* row, int64_t k) const {
    const __m256i v = _mm256_set1_epi32(int(load_u32(row + (k >> 1))));
    const __m256i i = _mm256_srlv_epi32(v, down);
    const __m256 a = _mm256_permutevar8x32_ps(lo, i), b = _mm256_permutevar8x32_ps(hi, i);
    return Vec8(_mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_sllv_epi32(v, up))));
  }
  Vec8 load_last(const uint8_t* row, int64_t k) const { return load(row, k); }
};

template <>
struct Avx2Dec<2> {  // four indices per byte
  __m256 t;
  __m256i down;
  explicit Avx2Dec(const float* table)
      : t(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(table))),
        down(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)) {}
  Vec8 load(const uint8_t* row, int64_t k) const {
    uint16_t u;
    std::memcpy(&u, row + (k >> 2), 2);
    return Vec8(_mm256_permutevar8x32_ps(t, _mm256_srlv_epi32(_mm256_set1_epi32(int(u)), down)));
  }
  Vec8 load_last(const uint8_t* row, int64_t k) const { return load(row, k); }
};

template <>
struct Avx2Dec<3> {  // eight indices per 3-byte unit
  __m256 t;
  __m256i down;
  explicit Avx2Dec(const float* table)
      : t(_mm256_loadu_ps(table)), down(_mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)) {}
  Vec8 from_bits(uint32_t u) const {
    return Vec8(_mm256_permutevar8x32_ps(t, _mm256_srlv_epi32(_mm256_set1_epi32(int(u)), down)));
  }
  // Reads 4 bytes: the unit and the first byte of the next one (never past the row's last unit).
  Vec8 load(const uint8_t* row, int64_t k) const { return from_bits(load_u32(row + 3 * (k >> 3))); }
  Vec8 load_last(const uint8_t* row, int64_t k) const {
    uint32_t u = 0;
    std::memcpy(&u, row + 3 * (k >> 3), 3);
    return from_bits(u);
  }
};

template <>
struct Avx2Dec<8> {  // one index per byte: eight scalar loads from the 1 KiB table (measured 1.9x
                     // faster than vgatherdps on Zen 3)
  const float* t;
  explicit Avx2Dec(const float* table) : t(table) {}
  Vec8 load(const uint8_t* row, int64_t k) const {
    uint64_t u;
    std::memcpy(&u, row + k, 8);
    const __m128 lo = _mm_set_ps(t[(u >> 24) & 255], t[(u >> 16) & 255], t[(u >> 8) & 255], t[u & 255]);
    const __m128 hi = _mm_set_ps(t[(u >> 56) & 255], t[(u >> 48) & 255], t[(u >> 40) & 255], t[(u >> 32) & 255]);
    return Vec8(_mm256_set_m128(hi, lo));
  }
  Vec8 load_last(const uint8_t* row, int64_t k) const { return load(row, k); }
};

struct Isa {
  using V = Vec8;
  static constexpr bool kNibbleGemm = true;
  static constexpr int64_t kNibbleRows = 4;
  static void nibble_gemm(const bigkernels::codebook::cpu::GemmArgs& g, int64_t m0, int64_t m1, int64_t n0,
                          int64_t n1);
  static V fma(V a, V b, V c) { return V(_mm256_fmadd_ps(a.x, b.x, c.x)); }
  template <int BITS>
  using Dec = Avx2Dec<BITS>;
};
}  // namespace

#include "codebook/codebook_cpu_kernels.h"
#include "codebook/codebook_cpu_panels.h"

// ---------------------------------------------------------------- 4-bit GEMM by byte shuffles
// A 16-entry fp32 table is four 16-byte planes (byte b of every entry); vpshufb looks up 32
// indices in one plane at once, and four byte unpacks (epi8 then epi16) put the four bytes of
// each looked-up float back together. 32 packed bytes (64 weights) take two nibble splits, 8
// shuffles and 16 unpacks: about half the vector uops of the vpermps decoder per weight. The
// weights come out in a fixed order within each 64-weight block, so each x row is permuted
// into that order once per block of work (kPerm), not the weights.
namespace {

// Position h * 32 + q * 8 + l of a permuted 64-block holds x[2e + h], e = 4q + l for l < 4 and
// 16 + 4q + (l - 4) otherwise (the low / high 128-bit lane of the unpacks).
inline void permute_block(const float* x, float* xp) {
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 4; ++q)
      for (int l = 0; l < 8; ++l) {
        const int e = l < 4 ? 4 * q + l : 16 + 4 * q + (l - 4);
        xp[h * 32 + q * 8 + l] = x[2 * e + h];
      }
}

struct Planes {
  __m256i p[4];
  explicit Planes(const float* table) {
    alignas(16) uint8_t bytes[4][16];
    for (int c = 0; c < 16; ++c) {
      const uint32_t u = float_to_bits(table[c]);
      for (int b = 0; b < 4; ++b) bytes[b][c] = uint8_t(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b) p[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[b])));
  }
  // 32 indices (one per byte) -> 32 fp32 weights in four vectors, in permute_block's order.
  void lookup(__m256i idx, __m256 f[4]) const {
    const __m256i b0 = _mm256_shuffle_epi8(p[0], idx), b1 = _mm256_shuffle_epi8(p[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(p[2], idx), b3 = _mm256_shuffle_epi8(p[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  }
};

// MR rows of x (permuted, row stride K64) times NR rows of W (one codebook) over k < K64, then
// the K tail in scalar on the unpermuted x.
template <int MR, int NR>
void nibble_tile(const GemmArgs& g, const float* xp, int64_t K64, int64_t m, int64_t n, const float* table) {
  const Planes P(table);
  const __m256i low = _mm256_set1_epi8(15);
  const int64_t ldi = g.w.ldi;
  const uint8_t* w = g.w.idx + n * ldi;
  // one accumulator per (row of x, row of W, output vector q): the four FMAs of a lookup go to
  // four independent chains (chained, they were latency-bound and spilled)
  __m256 acc[MR][NR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int q = 0; q < 4; ++q) acc[i][j][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K64; k += 64) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const uint8_t* p = w + j * ldi + (k >> 1);
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i idx[2] = {_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16(v, 4), low)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256 f[4];
        P.lookup(idx[h], f);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          const float* xr = xp + i * K64 + k + 32 * h;
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) acc[i][j][q] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * q), f[q], acc[i][j][q]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float* xr = g.x + (m + i) * g.ldx;
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wr = w + j * ldi;
      const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[i][j][0], acc[i][j][1]), _mm256_add_ps(acc[i][j][2], acc[i][j][3]));
      float s = float(Vec8(a).sum_lanes());
      for (int64_t k = K64; k < g.w.K; ++k) s += xr[k] * table[index_at<4>(wr, k)];
      if (g.bias) s = s + g.bias[n + j];
      store_float(g.out_dtype, g.out, (m + i) * g.ldo + (n + j), s);
    }
  }
}
}  // namespace

namespace {
void permute_x(const float* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, float* xp) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t k = 0; k < K64; k += 64) permute_block(x + m * ldx + k, xp + (m - m0) * K64 + k);
}
}  // namespace

void Isa::nibble_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K64 = g.w.K / 64 * 64;
  std::vector<float> own;
  const float* xrows = g.xp ? g.xp + m0 * K64 : nullptr;
  if (!xrows) {
    own.resize(size_t((m1 - m0) * K64));
    permute_x(g.x, g.ldx, g.w.K, m0, m1, own.data());
    xrows = own.data();
  }
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2)
    over_row_tiles<1>(g.w, n0, n1, [&](auto nr, int64_t n, const float* table) {
      nibble_tile<2, decltype(nr)::value>(g, xrows + (m - m0) * K64, K64, m, n, table);
    });
  if (m < m1)
    over_row_tiles<1>(g.w, n0, n1, [&](auto nr, int64_t n, const float* table) {
      nibble_tile<1, decltype(nr)::value>(g, xrows + (m - m0) * K64, K64, m, n, table);
    });
}

namespace {
// The panel engine from this many rows of x; below, the lookup-table tiles (each packed row
// streamed once, nothing packed) are faster. Measured, same process, one thread, CPU time
// (2026-12-02, Zen 3, load ~5), engine vs lookup tiles in ms: 1024^2 4-bit M = 8: 0.88 vs 0.67,
// M = 12: 0.80 vs 0.84, M = 16: 1.25 vs 1.29; 4096^2 4-bit M = 8: 14.1 vs 10.1, M = 12: 12.8 vs
// 14.0; 2 and 3 bits alike (M = 12: 0.77 vs 0.87, 0.68 vs 0.76); 8 bits: M = 8 0.85 vs 0.78,
// M = 12 1.32 vs 1.70. 8 bits, since the lookup tiles take up to 8 rows of x per decoded weight
// (codebook_cpu_kernels.h's mr_for), same process, one thread, CPU time (2026-12-02, quiet),
// lookup vs engine, 1024^2: M = 8 0.54 vs 0.68 ms, M = 9 0.79 vs 0.68, M = 11 0.98 vs 0.70.
int64_t engine_min_rows(int bits) { return bits == 8 ? 9 : 12; }
}  // namespace

namespace bigkernels::codebook::cpu {
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2",        lut_gemm_block<Isa>, dequantize_rows<Isa>, permute_x, Isa::kNibbleRows,
                         pack_x_panels, engine_gemm<Isa>,    engine_min_rows};
  return k;
}
}  // namespace bigkernels::codebook::cpu
#else
#include "codebook/codebook_cpu.h"
namespace bigkernels::codebook::cpu {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::codebook::cpu
#endif
