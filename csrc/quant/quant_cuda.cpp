// CUDA binding of the int8 quantisation ops quantize_per_token and w8a16_mm: validates the torch
// arguments (every check before any launch, naming the argument, the expected and the actual
// value), unpacks them into raw pointers and calls the launchers of quant_cuda_kernels.cu on the
// current stream. Semantics: bigkernels/reference/quant.py.
// Bound through the stable ABI (common/stable.h).
#include "common/stable.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "quant/quant_cuda.h"

namespace bigkernels::quant {
namespace {

namespace kc = bigkernels::quant::cuda;

bool is_float_type(st::ScalarType t) { return t == st::kFloat || t == st::kHalf || t == st::kBFloat16; }

kc::DType dtype_of(st::ScalarType t) {
  switch (t) {
    case st::kFloat: return kc::DType::kFloat;
    case st::kHalf: return kc::DType::kHalf;
    case st::kBFloat16: return kc::DType::kBFloat16;
    default: BK_CHECK(false, "bigkernels CUDA quant: unsupported dtype ", t);
  }
  return kc::DType::kFloat;  // unreachable
}

void check_launch(const char* op, cudaError_t err) {
  BK_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream(const st::Device& device) {
  return static_cast<cudaStream_t>(st::current_cuda_stream(device));
}

// A view whose rows are unit-stride (the kernels take a row stride); copies otherwise.
st::Tensor unit_column_stride(const st::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : st::contiguous(t);
}

std::tuple<st::Tensor, st::Tensor> quantize_per_token_cuda(const st::Tensor& x) {
  const char* op = "quantize_per_token";
  BK_CHECK(x.layout() == st::kStrided, op, ": expected a dense (strided) x, got layout ", x.layout());
  BK_CHECK(x.dim() == 2, op, ": expected a 2-D x, got ", x.dim(), "-D (shape ", x.sizes(), ")");
  BK_CHECK(is_float_type(x.scalar_type()), op, ": expected x to be float32, float16 or bfloat16, got ",
              x.scalar_type());
  BK_CHECK(x.is_cuda(), op, ": expected a CUDA x, got ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  // torch.amax over an empty row raises in the reference; say so before allocating anything.
  BK_CHECK(M == 0 || K > 0, op, ": expected x with at least one column (K >= 1), got shape ", x.sizes());
  BK_CHECK(M <= INT32_MAX, op, ": expected at most ", INT32_MAX, " rows, got ", M);

  st::DeviceGuard guard(st::device_index(x.device()));
  st::Tensor q = st::empty({M, K}, st::options(x).dtype(st::kChar));
  st::Tensor scale = st::empty({M}, st::options(x).dtype(st::kFloat));
  if (M == 0) return {q, scale};
  const st::Tensor xc = unit_column_stride(x);
  check_launch(op, kc::launch_quantize_per_token(xc.data_ptr(), dtype_of(xc.scalar_type()), M, K, xc.stride(0),
                                                 q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                                                 current_stream(x.device())));
  return {q, scale};
}

st::Tensor w8a16_mm_cuda(const st::Tensor& x, const st::Tensor& w_int8, const st::Tensor& w_scale,
                         const std::optional<st::Tensor>& bias) {
  const char* op = "w8a16_mm";
  BK_CHECK(x.layout() == st::kStrided && w_int8.layout() == st::kStrided && w_scale.layout() == st::kStrided,
              op, ": expected dense (strided) x, w_int8 and w_scale");
  BK_CHECK(x.dim() == 2, op, ": expected a 2-D x [M, K], got ", x.dim(), "-D (shape ", x.sizes(), ")");
  BK_CHECK(w_int8.dim() == 2, op, ": expected a 2-D w_int8 [N, K], got ", w_int8.dim(), "-D (shape ",
              w_int8.sizes(), ")");
  BK_CHECK(x.size(1) == w_int8.size(1), op, ": expected x [M, K] and w_int8 [N, K] with the same K, got ",
              x.sizes(), " and ", w_int8.sizes());
  BK_CHECK(is_float_type(x.scalar_type()), op, ": expected x to be float32, float16 or bfloat16, got ",
              x.scalar_type());
  BK_CHECK(w_int8.scalar_type() == st::kChar, op, ": expected w_int8 to be int8, got ", w_int8.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w_int8.size(0);
  BK_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, op, ": expected w_scale of shape [", N, "], got ",
              w_scale.sizes());
  BK_CHECK(st::isFloatingType(w_scale.scalar_type()), op, ": expected a floating-point w_scale, got ",
              w_scale.scalar_type());
  BK_CHECK(x.is_cuda(), op, ": expected a CUDA x, got ", x.device());
  BK_CHECK(w_int8.device() == x.device(), op, ": expected w_int8 on ", x.device(), " like x, got ",
              w_int8.device());
  BK_CHECK(w_scale.device() == x.device(), op, ": expected w_scale on ", x.device(), " like x, got ",
              w_scale.device());
  if (bias.has_value()) {
    BK_CHECK(bias->layout() == st::kStrided, op, ": expected a dense (strided) bias, got layout ", bias->layout());
    BK_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": expected bias of shape [", N, "], got ",
                bias->sizes());
    BK_CHECK(st::isFloatingType(bias->scalar_type()), op, ": expected a floating-point bias, got ",
                bias->scalar_type());
    BK_CHECK(bias->device() == x.device(), op, ": expected bias on ", x.device(), " like x, got ",
                bias->device());
  }

  st::DeviceGuard guard(st::device_index(x.device()));
  st::Tensor out = st::empty({M, N}, st::options(x));
  if (M == 0 || N == 0) return out;

  // Inputs the kernels take as they are: unit column stride, fp32 scales, a contiguous bias of a
  // float type (the reference reads both through .float(): float64 is rounded to fp32 likewise).
  const st::Tensor xc = unit_column_stride(x);
  const st::Tensor wc = unit_column_stride(w_int8);
  const st::Tensor sc = w_scale.scalar_type() == st::kFloat ? st::contiguous(w_scale) : st::contiguous(st::to(w_scale, st::kFloat));
  std::optional<st::Tensor> bc;
  if (bias.has_value()) {
    bc = is_float_type(bias->scalar_type()) ? st::contiguous(*bias) : st::contiguous(st::to(*bias, st::kFloat));
  }

  const kc::DType xd = dtype_of(xc.scalar_type());
  const int64_t elem = static_cast<int64_t>(xc.element_size());
  const cudaStream_t stream = current_stream(x.device());

  // Row blocks of kW8A16MaxRows activations: each re-reads W (the lead's dispatcher sends large M
  // elsewhere); one workspace serves every block.
  const int64_t rows = std::min<int64_t>(M, kc::kW8A16MaxRows);
  const int splits_full = kc::w8a16_splits(rows, N, K, xd);
  st::Tensor workspace;
  const size_t ws_bytes = kc::w8a16_workspace_bytes(rows, N, splits_full);
  const int64_t last_rows = M % kc::kW8A16MaxRows;
  const int splits_last = last_rows > 0 && M > kc::kW8A16MaxRows ? kc::w8a16_splits(last_rows, N, K, xd)
                                                                  : splits_full;
  const size_t ws_last = kc::w8a16_workspace_bytes(last_rows, N, splits_last);
  const size_t ws_max = std::max(ws_bytes, ws_last);
  if (ws_max > 0) {
    workspace = st::empty({static_cast<int64_t>((ws_max + sizeof(float) - 1) / sizeof(float))},
                          st::options(x).dtype(st::kFloat));
  }

  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* op_out = static_cast<char*>(out.data_ptr());
  for (int64_t m0 = 0; m0 < M; m0 += kc::kW8A16MaxRows) {
    const int64_t mb = std::min<int64_t>(kc::kW8A16MaxRows, M - m0);
    const int splits = mb == rows ? splits_full : splits_last;
    kc::W8A16Args args{};
    args.x = xp + m0 * xc.stride(0) * elem;
    args.x_dtype = xd;
    args.ldx = xc.stride(0);
    args.w = static_cast<const int8_t*>(wc.data_ptr());
    args.ldw = wc.stride(0);
    args.w_scale = sc.mutable_data_ptr<float>();
    args.bias = bc.has_value() ? bc->data_ptr() : nullptr;
    args.bias_dtype = bc.has_value() ? dtype_of(bc->scalar_type()) : kc::DType::kFloat;
    args.out = op_out + m0 * N * elem;
    args.M = mb;
    args.N = N;
    args.K = K;
    check_launch(op, kc::launch_w8a16_mm(args, splits, splits > 1 ? workspace.mutable_data_ptr<float>() : nullptr, stream));
  }
  return out;
}

}  // namespace
}  // namespace bigkernels::quant

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("quantize_per_token", TORCH_BOX(&bigkernels::quant::quantize_per_token_cuda));
  m.impl("w8a16_mm", TORCH_BOX(&bigkernels::quant::w8a16_mm_cuda));
}
