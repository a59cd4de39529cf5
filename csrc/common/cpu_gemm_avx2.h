// The packed GEMM engine of the AVX2 + FMA units: out [M, N] = A [M, K] . B [N, K]^T where B is
// any weight format that can write a cache-sized panel of itself as a dense tile. The structure
// is the classic one of BLIS / GotoBLAS:
//   A is packed once per call into panels of kMR rows ([K][kMR] each: one broadcast per row per k);
//   a unit of work (a block of rows by a block of output features, run by one thread) walks K in
//   blocks; for each block and each kNR-wide strip of features, the weight format's decoder writes
//   the strip as a dense [kc][kNR] panel (16 KB: it stays in L1) and the micro-kernel runs every
//   row panel of the unit against it, accumulating into the unit's buffer (L2), which the
//   decoder's epilogue finally writes out (scales, bias, output dtype).
// Two engines share that structure: fp32 (vfmadd231ps, 6 x 16 register tile) and int8 x int8 ->
// int32 (int8 widened to int16 pairs, vpmaddwd + vpaddd, 6 x 16 tile, exact; an int16 multiply
// does 16 multiply-adds per instruction where an fp32 FMA does 8). A decoder may report a panel
// as all zero (a missing sparse block): the micro-kernels skip it.
//
// Include only from a translation unit compiled for AVX2 + FMA + F16C (its first line
// `#pragma GCC target("avx2,fma,f16c")`), after a CPU check; like cpu_vec*.h, everything here is
// in an anonymous namespace so each unit gets its own copy.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_vec_avx2.h"

namespace {
namespace gemm {

constexpr int kMR = 6;         // rows per register tile (broadcast operands)
constexpr int kNR = 16;        // output features per register tile (two 8-lane vectors)
constexpr int64_t kKC = 256;   // fp32: k per panel (256 x 16 x 4 B = 16 KB)
constexpr int64_t kKC2 = 256;  // int16: k pairs per panel (256 x 16 x 2 x 2 B = 16 KB)

inline int64_t row_panels(int64_t m) { return (m + kMR - 1) / kMR; }
inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// 8 x 8 fp32 transpose of r[0..7] in place.
inline void transpose8x8_ps(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}

// ------------------------------------------------------------------ A packing
// fp32 A: row panel p (rows 6p .. 6p + 5) is [K][6] floats at dst + p * K * 6, rows past M zero.
template <class T>
void pack_a_f32(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    float* d = dst + p * K * kMR;
    const int64_t rows = std::min<int64_t>(kMR, M - p * kMR);
    const T* src[kMR];
    for (int i = 0; i < kMR; ++i) src[i] = i < rows ? x + (p * kMR + i) * ldx : nullptr;
    int64_t k = 0;
    if (rows == kMR) {  // 8 k of 6 rows: 6 vector loads, 48 floats stored in [k][6] order
      alignas(32) float t[kMR][8];
      for (; k + 8 <= K; k += 8) {
        for (int i = 0; i < kMR; ++i) Vec8::load(src[i] + k).store(t[i]);
        float* o = d + k * kMR;
        for (int kk = 0; kk < 8; ++kk)
          for (int i = 0; i < kMR; ++i) o[kk * kMR + i] = t[i][kk];
      }
    }
    for (; k < K; ++k)
      for (int i = 0; i < kMR; ++i) d[k * kMR + i] = src[i] ? Vec1::load(src[i] + k).x : 0.0f;
  }
}

// int8 A as int16 pairs: row panel p is [ceil(K / 2)][6] int32 at dst + p * ceil(K / 2) * 6, each
// int32 holding (int16) a[m][2j] | (int16) a[m][2j + 1] << 16 (zero past K and past M).
inline void pack_a_i8(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, int32_t* dst) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    int32_t* d = dst + p * K2 * kMR;
    int64_t j0 = 0;  // pairs done by the vector loop
    if (M - p * kMR >= kMR) {
      // 8 pairs (16 bytes) of each of the 6 rows: sign-extended to int16 (= 8 int32 pairs per row),
      // transposed as 8 x 8 lanes (rows 6, 7 unused) and stored as 8 runs of 6 pairs; the 8th run
      // stores only its 6 lanes (the next ones belong to the next pairs or the next panel).
      const int8_t* r0 = a + p * kMR * lda;
      const __m256i keep6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
      for (; 2 * (j0 + 8) <= K; j0 += 8) {
        __m256 t[8];
        for (int i = 0; i < kMR; ++i)
          t[i] = _mm256_castsi256_ps(
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + i * lda + 2 * j0))));
        t[6] = t[7] = _mm256_setzero_ps();
        transpose8x8_ps(t);
        int32_t* o = d + j0 * kMR;
        for (int c = 0; c < 7; ++c) _mm256_storeu_ps(reinterpret_cast<float*>(o + c * kMR), t[c]);
        _mm256_maskstore_epi32(o + 7 * kMR, keep6, _mm256_castps_si256(t[7]));
      }
    }
    for (int i = 0; i < kMR; ++i) {
      const int64_t m = p * kMR + i;
      if (m >= M) {
        for (int64_t j = 0; j < K2; ++j) d[j * kMR + i] = 0;
        continue;
      }
      const int8_t* r = a + m * lda;
      for (int64_t j = j0; j < K2; ++j) {
        const int32_t lo = r[2 * j], hi = 2 * j + 1 < K ? r[2 * j + 1] : 0;
        d[j * kMR + i] = int32_t(uint32_t(uint16_t(int16_t(lo))) | (uint32_t(uint16_t(int16_t(hi))) << 16));
      }
    }
  }
}

// ------------------------------------------------------------------ micro-kernels
// c[i * ldc + j] += sum_k a[k * 6 + i] * b[k * 16 + j] for i < 6, j < 16.
inline void ukernel_f32(int64_t kc, const float* a, const float* b, float* c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 7) == 0)  // a's next cache lines (16 k ahead): its panels stream from L2
      for (int l = 0; l < 3; ++l) _mm_prefetch(reinterpret_cast<const char*>(a + kMR * (k + 16) + 16 * l), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(b + kNR * k), b1 = _mm256_loadu_ps(b + kNR * k + 8);
    const float* ak = a + kMR * k;
    __m256 av;
#define BK_ROW(i)                              \
  av = _mm256_broadcast_ss(ak + i);            \
  c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);  \
  c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);
    BK_ROW(0) BK_ROW(1) BK_ROW(2) BK_ROW(3) BK_ROW(4) BK_ROW(5)
#undef BK_ROW
  }
#define BK_STORE(i)                                                                        \
  _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), c##i##0));     \
  _mm256_storeu_ps(c + i * ldc + 8, _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), c##i##1));
  BK_STORE(0) BK_STORE(1) BK_STORE(2) BK_STORE(3) BK_STORE(4) BK_STORE(5)
#undef BK_STORE
}

// c[i * ldc + j] += sum_j2 a_pair[j2 * 6 + i] . b_pair[j2 * 16 + j] (int16 pairs, int32 wrapping).
// In assembly: with intrinsics GCC schedules the broadcasts early and spills accumulators.
inline void ukernel_i16(int64_t kc2, const int32_t* a, const int32_t* b, int32_t* c, int64_t ldc) {
  alignas(32) int32_t acc[kMR][kNR];
  if (kc2 > 0) {
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm8, %%ymm8, %%ymm8\n\t vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm10, %%ymm10, %%ymm10\n\t vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        "1:\n\t"
        "vmovdqu (%[b]), %%ymm12\n\t vmovdqu 32(%[b]), %%ymm13\n\t"
#define BK_ROW(off, c0, c1)                                                \
  "vpbroadcastd " #off "(%[a]), %%ymm14\n\t"                               \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %%ymm" #c0 ", %%ymm" #c0 "\n\t" \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %%ymm" #c1 ", %%ymm" #c1 "\n\t"
        BK_ROW(0, 0, 1) BK_ROW(4, 2, 3) BK_ROW(8, 4, 5) BK_ROW(12, 6, 7) BK_ROW(16, 8, 9) BK_ROW(20, 10, 11)
#undef BK_ROW
        "add $24, %[a]\n\t add $64, %[b]\n\t dec %[k]\n\t jnz 1b\n\t"
        "vmovdqa %%ymm0, (%[o])\n\t vmovdqa %%ymm1, 32(%[o])\n\t vmovdqa %%ymm2, 64(%[o])\n\t"
        "vmovdqa %%ymm3, 96(%[o])\n\t vmovdqa %%ymm4, 128(%[o])\n\t vmovdqa %%ymm5, 160(%[o])\n\t"
        "vmovdqa %%ymm6, 192(%[o])\n\t vmovdqa %%ymm7, 224(%[o])\n\t vmovdqa %%ymm8, 256(%[o])\n\t"
        "vmovdqa %%ymm9, 288(%[o])\n\t vmovdqa %%ymm10, 320(%[o])\n\t vmovdqa %%ymm11, 352(%[o])\n\t"
        : [a] "+r"(a), [b] "+r"(b), [k] "+r"(kc2)
        : [o] "r"(&acc[0][0])
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  } else {
    std::memset(acc, 0, sizeof(acc));
  }
  for (int i = 0; i < kMR; ++i)
    for (int v = 0; v < 2; ++v) {
      __m256i* p = reinterpret_cast<__m256i*>(c + i * ldc + 8 * v);
      _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p),
                                              _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[i] + 8 * v))));
    }
}

// ------------------------------------------------------------------ one unit of work
// Rows [m0, m1) (m0 a multiple of kMR) by features [n0, n1) (n0 a multiple of kNR) of the product
// of the packed A (`ap`, from pack_a_f32 / pack_a_i8 over all rows) with the decoder's weight.
// Decoder (fp32 engine / int16 engine):
//   int64_t k_block(): the fp32 engine's k per panel (kKC, or e.g. a sparse block size)
//   bool pack(int64_t n, int64_t k0, int64_t kc, float* dst) / (n, j0, kc2, int32_t* dst):
//     the panel of features n .. n + 15 (zero past N) over k0 .. k0 + kc (int16: pairs j0 ..
//     j0 + kc2), as [kc][16] floats / [kc2][16] int32 pairs; false when it is all zero
//   void store(int64_t m, int64_t n, int64_t cnt, const float* / const int32_t* acc): row m's
//     sums for features n .. n + cnt - 1 -> the output
template <class T, class Dec, class Micro>
void unit(Dec& dec, const T* ap, int64_t depth, int64_t kcmax, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
          Micro micro) {
  if (m0 >= m1 || n0 >= n1) return;
  static thread_local std::vector<T> acc_buf, b_buf;  // (one pair per element type)
  const int64_t mp = row_panels(m1 - m0), nw = round_up(n1 - n0, kNR);
  acc_buf.assign(size_t(mp * kMR * nw), T(0));
  b_buf.resize(size_t(kcmax * kNR) + 16);
  T* acc = acc_buf.data();
  T* b = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(b_buf.data()) + 63) & ~uintptr_t(63));
  for (int64_t k0 = 0; k0 < depth; k0 += kcmax) {
    const int64_t kc = std::min(kcmax, depth - k0);
    for (int64_t j = 0; j < nw; j += kNR) {
      if (!dec.pack(n0 + j, k0, kc, b)) continue;
      for (int64_t p = 0; p < mp; ++p) {
        // The next row panel's first k (its A panel starts a whole depth away, past the hardware
        // prefetcher's stream) and its sums (read back at the end of its micro-kernel call).
        const int64_t q = p + 1 < mp ? p + 1 : 0;
        const char* an = reinterpret_cast<const char*>(ap + ((m0 / kMR + q) * depth + k0) * kMR);
        for (int l = 0; l < 6; ++l) _mm_prefetch(an + 64 * l, _MM_HINT_T0);
        const T* cn = acc + q * kMR * nw + (p + 1 < mp ? j : j + kNR < nw ? j + kNR : 0);
        for (int i = 0; i < kMR; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(cn + i * nw), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(cn + i * nw + kNR - 1), _MM_HINT_T0);
        }
        micro(kc, ap + ((m0 / kMR + p) * depth + k0) * kMR, b, acc + p * kMR * nw + j, nw);
      }
    }
  }
  for (int64_t m = m0; m < m1; ++m) dec.store(m, n0, n1 - n0, acc + (m - m0) * nw);
}

// fp32: depth K, k-blocks of dec.k_block().
template <class Dec>
void unit_f32(Dec& dec, const float* ap, int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  unit(dec, ap, K, std::max<int64_t>(1, dec.k_block()), m0, m1, n0, n1, ukernel_f32);
}

// int16 pairs: depth ceil(K / 2) pairs, k-blocks of kKC2 pairs (the decoder gets pair indices).
template <class Dec>
void unit_i16(Dec& dec, const int32_t* ap, int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  unit(dec, ap, (K + 1) / 2, kKC2, m0, m1, n0, n1, ukernel_i16);
}

// ------------------------------------------------------------------ panel writers for decoders
// 16 x 16 bytes transposed: out[c] byte r = in[r] byte c.
inline void transpose16x16_epi8(const __m128i in[16], __m128i out[16]) {
  __m128i s1[16], s2[16], s3[16];
  // s1[h * 8 + q]: rows 2q, 2q + 1 interleaved, columns 8h .. 8h + 7
  for (int q = 0; q < 8; ++q) {
    s1[q] = _mm_unpacklo_epi8(in[2 * q], in[2 * q + 1]);
    s1[8 + q] = _mm_unpackhi_epi8(in[2 * q], in[2 * q + 1]);
  }
  // s2[h * 8 + c4 * 4 + q]: rows 4q .. 4q + 3, columns 8h + 4c4 .. + 3
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 4; ++q) {
      s2[h * 8 + q] = _mm_unpacklo_epi16(s1[h * 8 + 2 * q], s1[h * 8 + 2 * q + 1]);
      s2[h * 8 + 4 + q] = _mm_unpackhi_epi16(s1[h * 8 + 2 * q], s1[h * 8 + 2 * q + 1]);
    }
  // s3[(h * 2 + c4) * 4 + c2 * 2 + o]: rows 8o .. 8o + 7, columns 8h + 4c4 + 2c2 .. + 1
  for (int hc = 0; hc < 4; ++hc)
    for (int o = 0; o < 2; ++o) {
      s3[hc * 4 + o] = _mm_unpacklo_epi32(s2[hc * 4 + 2 * o], s2[hc * 4 + 2 * o + 1]);
      s3[hc * 4 + 2 + o] = _mm_unpackhi_epi32(s2[hc * 4 + 2 * o], s2[hc * 4 + 2 * o + 1]);
    }
  // out[8h + 4c4 + 2c2 + c1]: rows 0 .. 15
  for (int hc = 0; hc < 4; ++hc)
    for (int c2 = 0; c2 < 2; ++c2) {
      out[hc * 4 + c2 * 2] = _mm_unpacklo_epi64(s3[hc * 4 + c2 * 2], s3[hc * 4 + c2 * 2 + 1]);
      out[hc * 4 + c2 * 2 + 1] = _mm_unpackhi_epi64(s3[hc * 4 + c2 * 2], s3[hc * 4 + c2 * 2 + 1]);
    }
}

// int8 rows rows[r] (r < 16; null = a zero row), inputs k0 .. k0 + kc, as a [kc][16] fp32 panel.
inline void panel_from_i8_rows(const int8_t* const rows[kNR], int64_t k0, int64_t kc, float* dst) {
  bool full = true;
  for (int r = 0; r < kNR; ++r) full = full && rows[r] != nullptr;
  int64_t k = 0;
  if (full) {
    __m128i in[16], t[16];
    for (; k + 16 <= kc; k += 16) {
      for (int r = 0; r < kNR; ++r) in[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k0 + k));
      transpose16x16_epi8(in, t);
      for (int c = 0; c < 16; ++c) {
        float* o = dst + (k + c) * kNR;
        _mm256_storeu_ps(o, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(t[c])));
        _mm256_storeu_ps(o + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(t[c], 8))));
      }
    }
  }
  for (; k < kc; ++k)
    for (int r = 0; r < kNR; ++r) dst[k * kNR + r] = rows[r] ? float(rows[r][k0 + k]) : 0.0f;
}

// int8 rows as a [kc2][16] panel of int16 pairs (inputs 2 * j0 .. 2 * (j0 + kc2), zero past K).
inline void panel_from_i8_rows_pairs(const int8_t* const rows[kNR], int64_t K, int64_t j0, int64_t kc2, int32_t* dst) {
  bool full = true;
  for (int r = 0; r < kNR; ++r) full = full && rows[r] != nullptr;
  const int64_t k0 = 2 * j0;
  int64_t j = 0;
  if (full) {
    __m128i in[16], t[16];
    for (; 2 * j + 16 <= std::min(2 * kc2, K - k0); j += 8) {
      for (int r = 0; r < kNR; ++r) in[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k0 + 2 * j));
      transpose16x16_epi8(in, t);
      for (int c = 0; c < 8; ++c) {  // pair c: inputs 2c, 2c + 1 of the 16
        int32_t* o = dst + (j + c) * kNR;
        const __m128i lo = _mm_unpacklo_epi8(t[2 * c], t[2 * c + 1]);  // rows 0..7: (a, b) byte pairs
        const __m128i hi = _mm_unpackhi_epi8(t[2 * c], t[2 * c + 1]);  // rows 8..15
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_cvtepi8_epi16(lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_cvtepi8_epi16(hi));
      }
    }
  }
  for (; j < kc2; ++j)
    for (int r = 0; r < kNR; ++r) {
      const int64_t k = k0 + 2 * j;
      const int32_t lo = rows[r] && k < K ? rows[r][k] : 0, hi = rows[r] && k + 1 < K ? rows[r][k + 1] : 0;
      dst[j * kNR + r] = int32_t(uint32_t(uint16_t(int16_t(lo))) | (uint32_t(uint16_t(int16_t(hi))) << 16));
    }
}

// Float rows rows[r] (r < 16, dtype T; null = a zero row), inputs k0 .. k0 + kc, as [kc][16] fp32.
template <class T>
void panel_from_rows(const T* const rows[kNR], int64_t k0, int64_t kc, float* dst) {
  int64_t k = 0;
  __m256 r8[8];
  for (; k + 8 <= kc; k += 8)
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 8; ++i) {
        const T* row = rows[h * 8 + i];
        r8[i] = row ? Vec8::load(row + k0 + k).x : _mm256_setzero_ps();
      }
      transpose8x8_ps(r8);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kNR + 8 * h, r8[i]);
    }
  for (; k < kc; ++k)
    for (int r = 0; r < kNR; ++r) dst[k * kNR + r] = rows[r] ? Vec1::load(rows[r] + k0 + k).x : 0.0f;
}

}  // namespace gemm
}  // namespace
