// CUDA binding of the cuSPARSELt 2:4 sparse tensor-core ops (schemas: bigkernels/ops/sparse_cuda.py):
//
//   sparse24_compress(w_dense [N, K]) -> uint8 [bytes]
//       The cuSPARSELt-compressed form (kept values + metadata, an opaque layout of the library's
//       choosing) of a 2:4-sparse fp16/bf16 weight: in every group of 4 consecutive elements of a row
//       at most 2 are non-zero (checked with cusparseLtSpMMAPruneCheck2; a weight that fails is
//       rejected, never pruned silently).
//   sparse24_cslt_mm(x [M, K], compressed, n, bias [n]?) -> [M, n] = x @ W^T + bias, in x's dtype.
//       One cusparseLtMatmul with the weight as the structured operand A:
//         D [n, M'] (column-major, i.e. the row-major out [M', n]) = W [n, K] . x'^T
//       where x' is x padded with zero rows to M' = M rounded up to 8 (cuSPARSELt's 16-bit dense
//       operands need both dimensions a multiple of 8); the bias is the epilogue's per-row-of-D
//       vector, so it is fused. fp32 accumulation (CUSPARSE_COMPUTE_32F).
//
// Plans (descriptors + default algorithm + plan) are cached per (device, dtype, M', n, K, has bias,
// stream) in a mutex-guarded map. The plan is built from a matmul descriptor holding the bias
// pointer, so a plan with a bias owns its bias buffer (n elements of x's dtype) and each call copies
// the caller's bias into it (converting its dtype) before the matmul, on the same stream, under the
// plan's lock. So no plan depends on the address of the caller's bias: a bias converted afresh per
// call (another dtype than x, as SparseLinear's fp32 bias under bf16 inputs) reuses the plan instead
// of building one per new address. The copy runs on every call (n elements on the stream): the
// stable ABI has no tensor identity or version counter to tell an unchanged bias. Plans are per stream, so calls on two streams never share a bias buffer.
// One cuSPARSELt handle per device, initialised on first use and never destroyed (teardown order
// at process exit is not ours to control). Workspaces come from torch's caching allocator;
// everything runs on the current stream of x's device (a DeviceGuard makes x's device current).
// Every check on user input comes before anything is allocated or launched. sm_80+ only: older
// devices get a clear error. sparse24_cslt_plans() -> int returns the number of cached plans.
//
// Compiled only when setup.py finds the nvidia-cusparselt wheel (-DBIGKERNELS_CUSPARSELT, which also
// links libcusparseLt.so.0); otherwise this file is empty and the ops have no CUDA kernel.
#ifdef BIGKERNELS_CUSPARSELT

#include <cuda_runtime_api.h>
#include <cusparseLt.h>
#include "common/stable.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace bigkernels::sparse {
namespace {

constexpr uint32_t kAlign = 16;        // bytes: the alignment promised to cuSPARSELt for every operand
constexpr int64_t kDenseMultiple = 8;  // 16-bit dense operands: rows and columns multiples of 8
constexpr int64_t kSparseMultiple = 16;  // the structured operand: rows and columns multiples of 16
constexpr size_t kMaxPlans = 1024;     // cache entries before the map is cleared (plans in use survive)

void check_lt(const char* op, const char* call, cusparseStatus_t status) {
  BK_CHECK(status == CUSPARSE_STATUS_SUCCESS, op, ": ", call, " failed: ", cusparseLtGetErrorName(status), " (",
              cusparseLtGetErrorString(status), ")");
}

void check_cuda(const char* op, const char* call, cudaError_t err) {
  BK_CHECK(err == cudaSuccess, op, ": ", call, " failed: ", cudaGetErrorString(err));
}

bool is_16bit(st::ScalarType t) { return t == st::kHalf || t == st::kBFloat16; }

cudaDataType cuda_type(st::ScalarType t) { return t == st::kHalf ? CUDA_R_16F : CUDA_R_16BF; }

bool aligned(const st::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0; }

// t itself when contiguous and 16-byte aligned, else a fresh (aligned) contiguous copy.
st::Tensor aligned_contiguous(const st::Tensor& t) {
  if (t.is_contiguous() && aligned(t)) return t;
  st::Tensor c = st::empty(t.sizes(), st::options(t));
  st::copy_(c, t);
  return c;
}

// Sparse tensor cores exist from sm_80 (Ampere) on.
void check_capability(const char* op, int device) {
  static std::mutex mu;
  static std::unordered_map<int, int>* cc = new std::unordered_map<int, int>();
  int major = 0, minor = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cc->find(device);
    if (it == cc->end()) {
      check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
      it = cc->emplace(device, major * 10 + minor).first;
    }
    major = it->second / 10;
    minor = it->second % 10;
  }
  BK_CHECK(major >= 8, op, ": 2:4 sparse tensor cores need a GPU of compute capability 8.0 or newer (sm_80+), "
              "but cuda:", device, " is sm_", major, minor, "; check bigkernels.ops.sparse_cuda.sparse24_supported(device) "
              "and use bigkernels::sparse24_mm there instead");
}

// One handle per device (the caller has made `device` current), never destroyed.
const cusparseLtHandle_t* handle_for(const char* op, int device) {
  static std::mutex mu;
  static auto* handles = new std::unordered_map<int, std::unique_ptr<cusparseLtHandle_t>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles->find(device);
  if (it == handles->end()) {
    auto h = std::make_unique<cusparseLtHandle_t>();
    check_lt(op, "cusparseLtInit", cusparseLtInit(h.get()));
    it = handles->emplace(device, std::move(h)).first;
  }
  return it->second.get();
}

// The structured descriptor of a row-major [n, k] weight (the same for compression and matmul).
void init_weight_descriptor(const char* op, const cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int64_t n,
                            int64_t k, st::ScalarType dtype) {
  check_lt(op, "cusparseLtStructuredDescriptorInit",
           cusparseLtStructuredDescriptorInit(h, d, n, k, k, kAlign, cuda_type(dtype), CUSPARSE_ORDER_ROW,
                                              CUSPARSELT_SPARSITY_50_PERCENT));
}

void check_weight_shape(const char* op, const char* what, int64_t n, int64_t k) {
  BK_CHECK(n > 0 && k > 0 && n % kSparseMultiple == 0 && k % kSparseMultiple == 0, op,
              ": cuSPARSELt needs a weight [N, K] with N and K positive multiples of ", kSparseMultiple, ", got ", what,
              " [", n, ", ", k, "]");
}

// ----- plan cache ---------------------------------------------------------------------------------
struct PlanKey {
  int device;
  int dtype;
  int64_t m, n, k;
  bool has_bias;
  int64_t stream;  // the cudaStream_t's address
  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && m == o.m && n == o.n && k == o.k && has_bias == o.has_bias &&
           stream == o.stream;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = std::hash<int64_t>()(key.m);
    for (uint64_t v : {static_cast<uint64_t>(key.n), static_cast<uint64_t>(key.k), static_cast<uint64_t>(key.has_bias),
                       static_cast<uint64_t>(key.device), static_cast<uint64_t>(key.dtype),
                       static_cast<uint64_t>(key.stream)}) {
      h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

// Everything one cusparseLtMatmul needs, destroyed in reverse order of creation.
struct Plan {
  cusparseLtMatDescriptor_t a{}, b{}, d{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  int built = 0;  // how many of a, b, d, alg, plan exist
  size_t workspace = 0;
  size_t compressed_size = 0;
  st::Tensor bias;  // [n] in x's dtype, the address baked into the plan (undefined: no bias)
  // Serialises "copy the caller's bias into `bias`, then matmul" of concurrent host threads.
  std::mutex mu;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (built >= 5) cusparseLtMatmulPlanDestroy(&plan);
    if (built >= 4) cusparseLtMatmulAlgSelectionDestroy(&alg);
    if (built >= 3) cusparseLtMatDescriptorDestroy(&d);
    if (built >= 2) cusparseLtMatDescriptorDestroy(&b);
    if (built >= 1) cusparseLtMatDescriptorDestroy(&a);
  }
};

std::shared_ptr<Plan> build_plan(const char* op, const cusparseLtHandle_t* h, const PlanKey& key,
                                 const st::TensorOptions& options) {
  const st::ScalarType dtype = options.dtype_;
  const cudaDataType t = cuda_type(dtype);
  auto p = std::make_shared<Plan>();
  void* bias = nullptr;
  if (key.has_bias) {
    p->bias = st::empty({key.n}, options);  // fresh from the allocator: 256-byte aligned
    bias = p->bias.data_ptr();
  }
  // A: the weight [n, k], row-major, structured.
  init_weight_descriptor(op, h, &p->a, key.n, key.k, dtype);
  p->built = 1;
  // B: x' [m, k] row-major, used transposed (op(B) = x'^T, [k, m]).
  check_lt(op, "cusparseLtDenseDescriptorInit(x)",
           cusparseLtDenseDescriptorInit(h, &p->b, key.m, key.k, key.k, kAlign, t, CUSPARSE_ORDER_ROW));
  p->built = 2;
  // C = D: [n, m] column-major with ld n, which is the row-major out [m, n].
  check_lt(op, "cusparseLtDenseDescriptorInit(out)",
           cusparseLtDenseDescriptorInit(h, &p->d, key.n, key.m, key.n, kAlign, t, CUSPARSE_ORDER_COL));
  p->built = 3;
  check_lt(op, "cusparseLtMatmulDescriptorInit",
           cusparseLtMatmulDescriptorInit(h, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE,
                                          &p->a, &p->b, &p->d, &p->d, CUSPARSE_COMPUTE_32F));
  if (bias != nullptr) {
    check_lt(op, "cusparseLtMatmulDescSetAttribute(BIAS_POINTER)",
             cusparseLtMatmulDescSetAttribute(h, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &bias, sizeof(bias)));
  }
  check_lt(op, "cusparseLtMatmulAlgSelectionInit",
           cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  p->built = 4;
  check_lt(op, "cusparseLtMatmulPlanInit", cusparseLtMatmulPlanInit(h, &p->plan, &p->matmul, &p->alg));
  p->built = 5;
  check_lt(op, "cusparseLtMatmulGetWorkspace", cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace));
  size_t buffer_size = 0;
  check_lt(op, "cusparseLtSpMMACompressedSize2",
           cusparseLtSpMMACompressedSize2(h, &p->a, &p->compressed_size, &buffer_size));
  return p;
}

std::mutex& plans_mutex() {
  static std::mutex mu;
  return mu;
}

std::unordered_map<PlanKey, std::shared_ptr<Plan>, PlanKeyHash>& plans() {
  static auto* map = new std::unordered_map<PlanKey, std::shared_ptr<Plan>, PlanKeyHash>();
  return *map;
}

std::shared_ptr<Plan> plan_for(const char* op, const cusparseLtHandle_t* h, const PlanKey& key,
                               const st::TensorOptions& options) {
  std::lock_guard<std::mutex> lock(plans_mutex());
  auto it = plans().find(key);
  if (it != plans().end()) return it->second;
  if (plans().size() >= kMaxPlans) plans().clear();  // callers holding a plan keep it alive
  auto p = build_plan(op, h, key, options);
  plans().emplace(key, p);
  return p;
}

int64_t sparse24_cslt_plans() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  return static_cast<int64_t>(plans().size());
}

// Copies `bias` into the plan's buffer (in x's dtype). The caller holds plan.mu and launches the
// matmul after it on the same stream. (Always: the stable ABI exposes neither tensor identity nor
// version counters, so "the same unchanged bias as last time" cannot be told; n elements, one
// small copy on the stream.)
void stage_bias(Plan& plan, const st::Tensor& bias) { st::copy_(plan.bias, bias); }

// ----- ops ----------------------------------------------------------------------------------------
st::Tensor sparse24_compress_cuda(const st::Tensor& w_dense) {
  const char* op = "sparse24_compress";
  BK_CHECK(w_dense.layout() == st::kStrided, op, ": expected a dense (strided) w_dense, got layout ",
              w_dense.layout());
  BK_CHECK(w_dense.dim() == 2, op, ": expected a 2-D w_dense [N, K], got ", w_dense.dim(), "-D (shape ",
              w_dense.sizes(), ")");
  BK_CHECK(is_16bit(w_dense.scalar_type()), op, ": expected w_dense to be float16 or bfloat16, got ",
              w_dense.scalar_type());
  BK_CHECK(w_dense.is_cuda(), op, ": expected a CUDA w_dense, got ", w_dense.device());
  const int64_t N = w_dense.size(0), K = w_dense.size(1);
  check_weight_shape(op, "w_dense", N, K);
  const int device = w_dense.get_device();
  check_capability(op, device);

  st::DeviceGuard guard(st::device_index(w_dense.device()));
  const cusparseLtHandle_t* h = handle_for(op, device);
  const cudaStream_t stream = static_cast<cudaStream_t>(st::current_cuda_stream(device));
  const st::Tensor w = aligned_contiguous(w_dense);

  cusparseLtMatDescriptor_t desc;
  init_weight_descriptor(op, h, &desc, N, K, w.scalar_type());
  struct DescGuard {
    cusparseLtMatDescriptor_t* d;
    ~DescGuard() { cusparseLtMatDescriptorDestroy(d); }
  } desc_guard{&desc};

  // The 2:4 check: 0 = every group of 4 along K has at most 2 non-zeros.
  st::Tensor d_valid = st::empty({1}, st::options(w).dtype(st::kInt));
  check_lt(op, "cusparseLtSpMMAPruneCheck2",
           cusparseLtSpMMAPruneCheck2(h, &desc, /*isSparseA=*/1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.data_ptr(),
                                      d_valid.mutable_data_ptr<int>(), stream));
  int invalid = 0;
  check_cuda(op, "cudaMemcpyAsync",
             cudaMemcpyAsync(&invalid, d_valid.mutable_data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  check_cuda(op, "cudaStreamSynchronize", cudaStreamSynchronize(stream));
  BK_CHECK(invalid == 0, op, ": w_dense [", N, ", ", K, "] is not 2:4 sparse: some group of 4 consecutive "
              "elements of a row holds more than 2 non-zeros (cusparseLtSpMMAPruneCheck); prune it first "
              "(bigkernels.prune_(..., pattern=\"2:4\") or bigkernels.sparse masks)");

  size_t compressed_size = 0, buffer_size = 0;
  check_lt(op, "cusparseLtSpMMACompressedSize2", cusparseLtSpMMACompressedSize2(h, &desc, &compressed_size, &buffer_size));
  st::Tensor out = st::empty({static_cast<int64_t>(compressed_size)}, st::options(w).dtype(st::kByte));
  st::Tensor buffer = st::empty({static_cast<int64_t>(buffer_size > 0 ? buffer_size : 1)}, st::options(w).dtype(st::kByte));
  check_lt(op, "cusparseLtSpMMACompress2",
           cusparseLtSpMMACompress2(h, &desc, /*isSparseA=*/1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.data_ptr(),
                                    out.data_ptr(), buffer.data_ptr(), stream));
  return out;
}

st::Tensor sparse24_cslt_mm_cuda(const st::Tensor& x, const st::Tensor& compressed, int64_t n,
                                 const std::optional<st::Tensor>& bias) {
  const char* op = "sparse24_cslt_mm";
  BK_CHECK(x.layout() == st::kStrided && compressed.layout() == st::kStrided, op,
              ": expected dense (strided) x and compressed");
  BK_CHECK(x.dim() == 2, op, ": expected a 2-D x [M, K], got ", x.dim(), "-D (shape ", x.sizes(), ")");
  BK_CHECK(is_16bit(x.scalar_type()), op, ": expected x to be float16 or bfloat16, got ", x.scalar_type());
  BK_CHECK(compressed.dim() == 1 && compressed.scalar_type() == st::kByte, op,
              ": expected compressed to be the 1-D uint8 tensor sparse24_compress returns, got ", compressed.dim(),
              "-D ", compressed.scalar_type());
  BK_CHECK(x.is_cuda(), op, ": expected a CUDA x, got ", x.device());
  BK_CHECK(compressed.device() == x.device(), op, ": expected compressed on ", x.device(), " like x, got ",
              compressed.device());
  const int64_t M = x.size(0), K = x.size(1);
  check_weight_shape(op, "a weight (from x and n)", n, K);
  if (bias.has_value()) {
    BK_CHECK(bias->layout() == st::kStrided, op, ": expected a dense (strided) bias, got layout ", bias->layout());
    BK_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": expected bias of shape [", n, "], got ", bias->sizes());
    BK_CHECK(st::isFloatingType(bias->scalar_type()), op, ": expected a floating-point bias, got ",
                bias->scalar_type());
    BK_CHECK(bias->device() == x.device(), op, ": expected bias on ", x.device(), " like x, got ", bias->device());
  }
  const int device = x.get_device();
  check_capability(op, device);

  st::DeviceGuard guard(st::device_index(x.device()));
  const cusparseLtHandle_t* h = handle_for(op, device);
  const int64_t Mp = (M + kDenseMultiple - 1) / kDenseMultiple * kDenseMultiple;
  cudaStream_t stream = static_cast<cudaStream_t>(st::current_cuda_stream(device));
  // Shapes only from here on: the plan also gives the byte count a compressed [n, K] weight has.
  auto plan = Mp > 0 ? plan_for(op, h,
                                PlanKey{device, static_cast<int>(x.scalar_type()), Mp, n, K, bias.has_value(),
                                        reinterpret_cast<int64_t>(stream)},
                                st::options(x))
                     : nullptr;
  if (plan != nullptr) {
    BK_CHECK(compressed.numel() == static_cast<int64_t>(plan->compressed_size), op, ": compressed holds ",
                compressed.numel(), " bytes, but a cuSPARSELt-compressed [", n, ", ", K, "] ", x.scalar_type(),
                " weight has ", plan->compressed_size, ": pass the sparse24_compress output of a [n, K] weight of x's "
                "dtype, with n = the weight's rows");
  }
  st::Tensor out = st::empty({Mp, n}, st::options(x));
  if (M == 0) return out;

  st::Tensor xp = x;
  if (Mp != M || !x.is_contiguous() || !aligned(x)) {
    xp = st::zeros({Mp, K}, st::options(x));
    st::Tensor rows = st::narrow(xp, 0, 0, M);
    st::copy_(rows, x);
  }
  const st::Tensor wc = aligned_contiguous(compressed);
  st::Tensor workspace;
  if (plan->workspace > 0) workspace = st::empty({static_cast<int64_t>(plan->workspace)}, st::options(x).dtype(st::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  // The epilogue reads the bias (in the output's type) from the plan's buffer.
  std::lock_guard<std::mutex> plan_lock(plan->mu);
  if (bias.has_value()) stage_bias(*plan, *bias);
  check_lt(op, "cusparseLtMatmul",
           cusparseLtMatmul(h, &plan->plan, &alpha, wc.data_ptr(), xp.data_ptr(), &beta, out.data_ptr(), out.data_ptr(),
                            plan->workspace > 0 ? workspace.data_ptr() : nullptr, &stream, 1));
  return Mp == M ? out : st::narrow(out, 0, 0, M);
}

}  // namespace
}  // namespace bigkernels::sparse

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("sparse24_compress", TORCH_BOX(&bigkernels::sparse::sparse24_compress_cuda));
  m.impl("sparse24_cslt_mm", TORCH_BOX(&bigkernels::sparse::sparse24_cslt_mm_cuda));
}

// No tensor arguments: the kernel serves every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(bigkernels, CompositeExplicitAutograd, m) {
  m.impl("sparse24_cslt_plans", TORCH_BOX(&bigkernels::sparse::sparse24_cslt_plans));
}

#endif  // BIGKERNELS_CUSPARSELT
