// The subset of the LibTorch *stable* ABI (torch/csrc/stable, torch/headeronly) the kernel bindings
// use, under short ATen-like names (namespace bigkernels::st), so a binding reads as it did with
// ATen: st::Tensor, st::TensorList, st::kFloat, st::empty(sizes, st::options(t).dtype(...)),
// BK_CHECK(cond, message parts...). Nothing here is ATen's C++ API: every call goes through the
// stable C shims, so bigkernels._C built once loads on every torch from TORCH_TARGET_VERSION
// (setup.py: 2.10, the first with the list arguments, parallel_for and the ops used here) on.
//
// What the stable ABI does not have, and how the bindings do without it:
// - autograd version counters: the params of the in-place ops are bumped by an ADInplaceOrView
//   kernel registered from Python (bigkernels/ops/_extension.py), as torch.library.custom_op does;
// - at::get_thread_num: per-thread scratch is handed out by ThreadSlots below.
#pragma once

#ifdef USE_CUDA
#include <torch/csrc/stable/accelerator.h>
#endif
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bigkernels::st {

using Tensor = torch::stable::Tensor;
using TensorList = std::vector<Tensor>;  // a `Tensor[]` argument (bindings take it by const reference)
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using ScalarType = torch::headeronly::ScalarType;
using Layout = torch::headeronly::Layout;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

constexpr ScalarType kFloat = ScalarType::Float, kHalf = ScalarType::Half, kBFloat16 = ScalarType::BFloat16,
                     kDouble = ScalarType::Double, kChar = ScalarType::Char, kByte = ScalarType::Byte,
                     kInt = ScalarType::Int, kLong = ScalarType::Long, kBool = ScalarType::Bool;
constexpr Layout kStrided = Layout::Strided;

inline bool isFloatingType(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}
inline bool isComplexType(ScalarType t) {
  return t == ScalarType::ComplexHalf || t == ScalarType::ComplexFloat || t == ScalarType::ComplexDouble;
}

// ---- messages, formatted as c10 formats them (dtype "Float", device "cuda:0", shape "[2, 3]")
namespace detail {
template <class T>
void put(std::ostream& os, const T& v) { os << v; }
inline void put(std::ostream& os, ScalarType t) { os << torch::headeronly::toString(t); }
inline void put(std::ostream& os, Layout l) {
  static const char* const names[] = {"Strided", "Sparse", "SparseCsr", "Mkldnn", "SparseCsc",
                                      "SparseBsr", "SparseBsc", "Jagged"};
  const int i = int(l);
  os << (i >= 0 && i < 8 ? names[i] : "UnknownLayout");
}
inline void put(std::ostream& os, const Device& d) {
  switch (d.type()) {
    case DeviceType::CPU: os << "cpu"; break;
    case DeviceType::CUDA: os << "cuda"; break;
    case DeviceType::Meta: os << "meta"; break;
    default: os << "device_type_" << int(d.type()); break;
  }
  if (d.has_index()) os << ":" << int(d.index());
}
inline void put(std::ostream& os, IntArrayRef s) {
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
}
inline void put(std::ostream& os, const std::vector<int64_t>& s) { put(os, IntArrayRef(s)); }

template <class... A>
[[noreturn]] void fail(const A&... parts) {
  std::ostringstream os;
  (put(os, parts), ...);
  throw std::runtime_error(os.str());  // RuntimeError in Python, as TORCH_CHECK's c10::Error
}
}  // namespace detail

// TORCH_CHECK for the stable ABI: the message parts are only formatted when cond fails.
#define BK_CHECK(cond, ...)                                       \
  do {                                                            \
    if (!(cond)) ::bigkernels::st::detail::fail(__VA_ARGS__);     \
  } while (0)

// ---- tensor options and factories
struct __attribute__((visibility("hidden"))) TensorOptions {  // hidden like the stable Device it holds
  ScalarType dtype_ = kFloat;
  Device device_ = Device(DeviceType::CPU);
  bool pinned_ = false;
  TensorOptions dtype(ScalarType t) const { TensorOptions o = *this; o.dtype_ = t; return o; }
  TensorOptions device(const Device& d) const { TensorOptions o = *this; o.device_ = d; return o; }
  TensorOptions pinned_memory(bool p) const { TensorOptions o = *this; o.pinned_ = p; return o; }
};

inline TensorOptions options(const Tensor& t) { return TensorOptions{t.scalar_type(), t.device(), false}; }

inline Tensor empty(IntArrayRef sizes, const TensorOptions& o) {
  return torch::stable::empty(sizes, o.dtype_, kStrided, o.device_, o.pinned_ ? std::optional<bool>(true)
                                                                               : std::nullopt);
}
inline Tensor empty(std::initializer_list<int64_t> sizes, const TensorOptions& o) {
  return empty(IntArrayRef(sizes), o);
}
inline Tensor zeros(IntArrayRef sizes, const TensorOptions& o) {
  Tensor t = empty(sizes, o);
  torch::stable::zero_(t);
  return t;
}
inline Tensor zeros(std::initializer_list<int64_t> sizes, const TensorOptions& o) { return zeros(IntArrayRef(sizes), o); }
inline Tensor scalar_tensor(double value, const TensorOptions& o) {
  Tensor t = empty(IntArrayRef(), o);
  torch::stable::fill_(t, value);
  return t;
}

inline Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor to(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(const_cast<Tensor&>(t), dim, start, length);
}
inline void copy_(Tensor& dst, const Tensor& src, bool non_blocking = false) {
  torch::stable::copy_(dst, src, non_blocking);
}
inline Tensor zero_(Tensor& t) { return torch::stable::zero_(t); }

// Per-tensor checks of long tensor lists on the raw shim codes: Tensor::scalar_type() / device() /
// layout() map the code through a chain of shim calls (up to ~20 for a dtype), these take one.
inline int32_t dtype_code(const Tensor& t) {
  int32_t d;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &d));
  return d;
}
inline bool same_dtype(const Tensor& a, const Tensor& b) { return dtype_code(a) == dtype_code(b); }
inline bool is_bool(const Tensor& t) { return dtype_code(t) == aoti_torch_dtype_bool(); }
inline bool is_float32(const Tensor& t) { return dtype_code(t) == aoti_torch_dtype_float32(); }
inline bool same_device(const Tensor& a, const Tensor& b) {
  int32_t ta, tb, ia, ib;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(a.get(), &ta));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(b.get(), &tb));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(a.get(), &ia));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(b.get(), &ib));
  return ta == tb && ia == ib;
}
inline bool is_strided(const Tensor& t) {
  int32_t l;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_layout(t.get(), &l));
  return l == aoti_torch_layout_strided();
}

// Typed data pointer without a dtype check per call (callers have validated the dtype).
template <class T>
T* data(const Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// ---- threads
inline int64_t get_num_threads() { return int64_t(torch::stable::get_num_threads()); }

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

// Per-thread scratch without at::get_thread_num: parallel_for calls its body at most once per
// thread (OpenMP and native backends alike: at most get_num_threads() chunks), so each call of
// the body takes the next slot, and slots() = get_num_threads() buffers suffice.
class ThreadSlots {
 public:
  ThreadSlots() : slots_(get_num_threads()) {}
  int64_t slots() const { return slots_; }
  int64_t take() {
    const int64_t s = next_.fetch_add(1);
    BK_CHECK(s < slots_, "bigkernels: parallel_for ran more chunks (", s + 1, ") than threads (", slots_, ")");
    return s;
  }

 private:
  int64_t slots_;
  std::atomic<int64_t> next_{0};
};

#ifdef USE_CUDA
// ---- CUDA (the _cuda.cpp bindings; setup.py defines USE_CUDA for them)
using DeviceGuard = torch::stable::accelerator::DeviceGuard;  // makes a device index current

inline int32_t device_index(const Device& d) { return d.index(); }
inline int32_t device_index(int device) { return device; }

// The current CUDA stream of a device (cudaStream_t as void*), torch's as at::cuda's would be.
template <class D>
void* current_cuda_stream(const D& device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index(device), &stream));
  return stream;
}
#endif

}  // namespace bigkernels::st
