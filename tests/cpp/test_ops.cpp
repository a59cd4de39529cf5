// libtorch user's view of the CMake build: the ops are reachable through the dispatcher with no
// Python. Checks sum_of_squares and one fused AdamW step (with a pruning mask) against values
// computed here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>

int main() {
  auto sumsq = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("bigkernels::sum_of_squares", "")
                   .typed<at::Tensor(at::TensorList)>();
  at::manual_seed(0);
  std::vector<at::Tensor> xs{at::randn({1000}), at::randn({7, 13})};
  const double got = sumsq.call(xs).item<double>();
  const double want = (xs[0].to(at::kDouble).square().sum() + xs[1].to(at::kDouble).square().sum()).item<double>();
  if (std::abs(got - want) > 1e-5 * want) {
    std::printf("sum_of_squares: %f != %f\n", got, want);
    return 1;
  }
  auto adamw = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("bigkernels::fused_adamw_", "")
                   .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                               at::TensorList, double, double, double, double, double, bool, bool,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, double, const std::optional<at::TensorList>&)>();
  at::Tensor p = at::ones({5}), g = at::full({5}, 0.5), m = at::zeros({5}), v = at::zeros({5}),
             step = at::zeros({});
  at::Tensor keep = at::ones({5}, at::kBool);
  keep[2].fill_(false);
  adamw.call({p}, {g}, {m}, {v}, {}, {step}, 0.1, 0.9, 0.999, 0.0, 1e-8, false, false, std::nullopt, std::nullopt,
             std::nullopt, 0.0, at::TensorList(keep));
  // first Adam step moves each weight by lr * sign(grad) (up to eps); the pruned one is zero
  if (std::abs(p[0].item<float>() - 0.9f) > 1e-6 || p[2].item<float>() != 0.0f || step.item<float>() != 1.0f) {
    std::printf("fused_adamw_: p=%f p[2]=%f step=%f\n", p[0].item<float>(), p[2].item<float>(), step.item<float>());
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
