// Multi-tensor apply: one kernel launch updates many tensors.
//
// The host describes every tensor in a metadata table (see TableLayout): for tensor t, its list
// pointers (params, grads, states...), numel, optional step counter, optional pruning mask, and
// whether all of its pointers are 16-byte aligned; plus the exclusive prefix sum of the tensors'
// chunk counts (chunk_start[0] = 0, chunk_start[n] = total chunks). The table is written into pinned host
// memory and copied to the device with one asynchronous copy on the launch stream.
//
// The kernel runs a persistent grid (about as many blocks as fit on the GPU at once); block b
// handles the global chunks b, b + gridDim.x, ..., finds each chunk's tensor by binary search over
// chunk_start (searching upward from the previous hit, since the chunk index only grows), and
// streams the chunk: 16-byte vector loads/stores when the tensor is aligned, scalar otherwise and
// for the tail of its last chunk. Maths is fp32 for every storage type (float, half, bfloat16).
//
// Tensors with zero elements may sit in the table (they own no chunk: their chunk_start equals
// the next one, so the search never lands on them); the table still carries their step pointer.
//
// Only included by .cu files (device code); the layout helpers are plain host code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace bigkernels::mta {

constexpr int kMaxLists = 5;          // params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
constexpr int kBlockSize = 256;       // threads per block of every multi-tensor kernel
constexpr int64_t kChunkSize = 32768; // elements per chunk; a power of two, so every chunk of an
                                      // aligned tensor starts 16-byte aligned whatever the dtype
static_assert(kChunkSize % kBlockSize == 0 && (kChunkSize & (kChunkSize - 1)) == 0, "chunk size");

// One tensor of the table (80 bytes).
struct alignas(16) Entry {
  void* ptr[kMaxLists];  // data pointers, list by list (unused lists: nullptr)
  int64_t numel;         // elements of each of the tensors
  float* step;           // fp32 step counter, or nullptr
  const uint8_t* keep;   // pruning mask (one byte per element; 0 = pruned), or nullptr
  int32_t aligned;       // 1 when every used pointer (keep included) is 16-byte aligned
  int32_t reserved;
};
static_assert(sizeof(Entry) == 80, "Entry layout");

// Where things are inside the table buffer: chunk_start[n + 1] (int64) then entries[n].
struct TableLayout {
  size_t entries_offset;
  size_t bytes;
};

inline TableLayout table_layout(int num_tensors) {
  const size_t starts = static_cast<size_t>(num_tensors + 1) * sizeof(int64_t);
  const size_t entries_offset = (starts + 63) / 64 * 64;
  return {entries_offset, entries_offset + static_cast<size_t>(num_tensors) * sizeof(Entry)};
}

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Builds the entry of one tensor; `num_lists` pointers are used, the rest are set to nullptr.
inline Entry make_entry(void* const* ptrs, int num_lists, int64_t numel, float* step, const uint8_t* keep) {
  Entry e{};
  bool aligned = keep == nullptr || is_aligned16(keep);
  for (int j = 0; j < kMaxLists; ++j) {
    e.ptr[j] = j < num_lists ? ptrs[j] : nullptr;
    if (e.ptr[j] != nullptr && !is_aligned16(e.ptr[j])) aligned = false;
  }
  e.numel = numel;
  e.step = step;
  e.keep = keep;
  e.aligned = aligned ? 1 : 0;
  e.reserved = 0;
  return e;
}

// Writes chunk_start from the entries already stored in the host buffer; returns total chunks.
inline int64_t finish_table(void* host, int num_tensors) {
  const TableLayout layout = table_layout(num_tensors);
  auto* starts = static_cast<int64_t*>(host);
  const auto* entries = reinterpret_cast<const Entry*>(static_cast<char*>(host) + layout.entries_offset);
  int64_t total = 0;
  for (int t = 0; t < num_tensors; ++t) {
    starts[t] = total;
    total += num_chunks(entries[t].numel);
  }
  starts[num_tensors] = total;
  return total;
}

inline Entry* table_entries(void* host, int num_tensors) {
  return reinterpret_cast<Entry*>(static_cast<char*>(host) + table_layout(num_tensors).entries_offset);
}

// The kernels' view of a table already on the device.
struct Table {
  const int64_t* chunk_start;  // [num_tensors + 1]
  const Entry* entries;        // [num_tensors]
  int64_t total_chunks;
  int num_tensors;
};

inline Table device_table(const void* device_base, int num_tensors, int64_t total_chunks) {
  const TableLayout layout = table_layout(num_tensors);
  return Table{static_cast<const int64_t*>(device_base),
               reinterpret_cast<const Entry*>(static_cast<const char*>(device_base) + layout.entries_offset),
               total_chunks, num_tensors};
}

// ---------------------------------------------------------------------------------------------
// Grid sizing: blocks that fit on the device at once, cached per kernel and device.

inline int device_sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < 64) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// `Kernel` is a __global__ function pointer (a template argument, so each kernel has its cache).
template <auto Kernel>
int resident_blocks(int block_size) {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  if (dev >= 0 && dev < 64) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, block_size, 0) != cudaSuccess || per_sm <= 0) {
    (void)cudaGetLastError();  // do not leave a sticky error for the launch check
    per_sm = 2;
  }
  const int blocks = per_sm * device_sm_count();
  if (dev >= 0 && dev < 64) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <auto Kernel>
int persistent_grid(int64_t total_chunks, int block_size = kBlockSize) {
  const int64_t resident = resident_blocks<Kernel>(block_size);
  return static_cast<int>(total_chunks < resident ? total_chunks : resident);
}

// ---------------------------------------------------------------------------------------------
// Device side.

// The tensor owning global chunk c: the t in [lo, n) with chunk_start[t] <= c < chunk_start[t+1].
// Requires chunk_start[lo] <= c < chunk_start[n]. Uniform across the block (no divergence).
__device__ __forceinline__ int find_tensor(const int64_t* __restrict__ chunk_start, int n, int64_t c, int lo) {
  int hi = n;
  while (hi - lo > 1) {
    const int mid = lo + ((hi - lo) >> 1);
    if (__ldg(chunk_start + mid) <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Memory access through explicit global-space intrinsics: the data pointers come from the table,
// so the compiler cannot infer their address space and would otherwise emit generic LD/ST.
// `kReadOnly` (data not written by anyone during the kernel) uses the non-coherent path.
template <bool kReadOnly, typename T>
__device__ __forceinline__ T ld_global(const T* p) {
  if constexpr (kReadOnly) {
    return __ldg(p);
  } else {
    return __ldca(p);
  }
}
template <typename T>
__device__ __forceinline__ void st_global(T* p, const T& v) {
  __stwb(p, v);
}
template <bool kReadOnly>
__device__ __forceinline__ uint4 ld16(const void* p) {
  return ld_global<kReadOnly>(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void st16(void* p, const uint4& v) { st_global(reinterpret_cast<uint4*>(p), v); }

// The table entry of tensor t, read with four 16-byte read-only loads (uniform across the block).
__device__ __forceinline__ Entry load_entry(const Entry* __restrict__ entries, int t) {
  const uint4* src = reinterpret_cast<const uint4*>(entries + t);
  uint4 w[sizeof(Entry) / 16];
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Entry) / 16); ++i) w[i] = __ldg(src + i);
  Entry e;
  memcpy(&e, w, sizeof(Entry));
  return e;
}

// Storage type <-> fp32, one element or one 16-byte vector at a time.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static __forceinline__ float to_float(float x) { return x; }
  __device__ static __forceinline__ float from_float(float x) { return x; }
  __device__ static __forceinline__ void unpack(const uint4& r, float (&v)[kVec]) {
    v[0] = __uint_as_float(r.x);
    v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z);
    v[3] = __uint_as_float(r.w);
  }
  __device__ static __forceinline__ uint4 pack(const float (&v)[kVec]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};

// 16-bit storage types: eight values per 16-byte vector. `Bits` (the Elem specialisation itself)
// supplies lo/hi (the low/high half of a 32-bit word as fp32) and bits (fp32 -> 16 bits, RNE).
template <typename Bits>
struct Elem16 {
  static constexpr int kVec = 8;
  __device__ static __forceinline__ uint32_t two(float a, float b) { return Bits::bits(a) | (Bits::bits(b) << 16); }
  __device__ static __forceinline__ void unpack(const uint4& r, float (&v)[kVec]) {
    v[0] = Bits::lo(r.x), v[1] = Bits::hi(r.x), v[2] = Bits::lo(r.y), v[3] = Bits::hi(r.y);
    v[4] = Bits::lo(r.z), v[5] = Bits::hi(r.z), v[6] = Bits::lo(r.w), v[7] = Bits::hi(r.w);
  }
  __device__ static __forceinline__ uint4 pack(const float (&v)[kVec]) {
    return make_uint4(two(v[0], v[1]), two(v[2], v[3]), two(v[4], v[5]), two(v[6], v[7]));
  }
};

template <>
struct Elem<__half> : Elem16<Elem<__half>> {
  __device__ static __forceinline__ float to_float(__half x) { return __half2float(x); }
  __device__ static __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  __device__ static __forceinline__ float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ static __forceinline__ float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ static __forceinline__ uint32_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <>
struct Elem<__nv_bfloat16> : Elem16<Elem<__nv_bfloat16>> {
  __device__ static __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  // bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
  __device__ static __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  __device__ static __forceinline__ uint32_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

// x[k] = 0 where keep[k] == 0, for V consecutive mask bytes starting at an 8-byte aligned (V == 8)
// or 4-byte aligned (V == 4) address.
template <int V>
__device__ __forceinline__ void zero_pruned(const uint8_t* keep, float (&x)[V]) {
  static_assert(V == 4 || V == 8, "mask vector width");
  uint32_t w[V / 4];
  if constexpr (V == 4) {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(keep));
  } else {
    const uint2 both = __ldg(reinterpret_cast<const uint2*>(keep));
    w[0] = both.x;
    w[1] = both.y;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (((w[k / 4] >> (8 * (k % 4))) & 0xffu) == 0) x[k] = 0.0f;
  }
}

// The elementwise multi-tensor kernel.
//
// Op contract (a trivially copyable struct passed by value):
//   static constexpr int kLists;                  lists used, <= kMaxLists
//   static constexpr bool writes(int list);       whether the list is stored back
//   __device__ bool begin_block();                per thread, once: false => do nothing at all
//   __device__ void begin_tensor(const Entry&);   per thread, when the tensor changes; all
//                                                 threads of the block call it together
//   __device__ void operator()(float (&x)[kLists]) const;   one element of every list, in place
// When the tensor's entry has a `keep` mask, list 0 (the params) is stored as +0 wherever the mask
// byte is 0, whatever the op computed (pruned weights stay exactly zero; NaN included).
template <typename T, typename Op>
__global__ void __launch_bounds__(kBlockSize) apply_kernel(Table table, Op op) {
  constexpr int N = Op::kLists;
  constexpr int V = Elem<T>::kVec;
  static_assert(N <= kMaxLists, "too many lists");
  if (!op.begin_block()) return;

  int t = 0;
  int current = -1;
  for (int64_t c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    t = find_tensor(table.chunk_start, table.num_tensors, c, t);
    const Entry e = load_entry(table.entries, t);
    if (t != current) {
      op.begin_tensor(e);
      current = t;
    }
    const int64_t first = (c - __ldg(table.chunk_start + t)) * kChunkSize;
    const int64_t left = e.numel - first;
    const int n = static_cast<int>(left < kChunkSize ? left : kChunkSize);
    T* p[N];
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = static_cast<T*>(e.ptr[j]) + first;
    const uint8_t* keep = e.keep != nullptr ? e.keep + first : nullptr;  // uniform across the block

    int tail = 0;
    if (e.aligned) {
      const int nvec = n / V;
      for (int i = threadIdx.x; i < nvec; i += kBlockSize) {
        float v[N][V];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          // j is a constant once unrolled: only one of the two loads survives.
          Elem<T>::unpack(Op::writes(j) ? ld16<false>(p[j] + i * V) : ld16<true>(p[j] + i * V), v[j]);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float x[N];
#pragma unroll
          for (int j = 0; j < N; ++j) x[j] = v[j][k];
          op(x);
#pragma unroll
          for (int j = 0; j < N; ++j) v[j][k] = x[j];
        }
        if (keep != nullptr) zero_pruned<V>(keep + i * V, v[0]);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if (Op::writes(j)) st16(p[j] + i * V, Elem<T>::pack(v[j]));
        }
      }
      tail = nvec * V;
    }
    for (int i = tail + static_cast<int>(threadIdx.x); i < n; i += kBlockSize) {
      float x[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        x[j] = Elem<T>::to_float(Op::writes(j) ? ld_global<false>(p[j] + i) : ld_global<true>(p[j] + i));
      }
      op(x);
      if (keep != nullptr && __ldg(keep + i) == 0) x[0] = 0.0f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (Op::writes(j)) st_global(p[j] + i, Elem<T>::from_float(x[j]));
      }
    }
  }
}

// Launches apply_kernel<T, Op> over a device table; returns the launch status.
template <typename T, typename Op>
cudaError_t apply(const Table& table, const Op& op, cudaStream_t stream) {
  if (table.total_chunks <= 0) return cudaSuccess;
  const int grid = persistent_grid<&apply_kernel<T, Op>>(table.total_chunks);
  apply_kernel<T, Op><<<grid, kBlockSize, 0, stream>>>(table, op);
  return cudaGetLastError();
}

}  // namespace bigkernels::mta
