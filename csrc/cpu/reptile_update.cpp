// CPU kernel of metakernels::reptile_update (math in csrc/kernels/reptile_update.h). Its autograd is
// linear and rarely used, so it is registered from Python (metakernels/ops/reptile_update.py).
#include "../kernels/reptile_update.h"
#include "common.h"
#include "registrations.h"

namespace metakernels {

at::Tensor reptile_update_cpu(const at::Tensor& theta_in, const at::Tensor& fast_in, double epsilon) {
  constexpr const char* kOp = "reptile_update";
  check_task_batch(kOp, "fast_weights", fast_in);
  check_floating(kOp, "fast_weights", fast_in);
  check_like(kOp, "theta", theta_in, "fast_weights", fast_in);
  TORCH_CHECK_VALUE(theta_in.dim() == 1 && theta_in.size(0) == fast_in.size(1),
                    "metakernels.reptile_update: theta must be [P] with P = ", fast_in.size(1),
                    " (the columns of fast_weights), got shape ", shape_str(theta_in));
  TORCH_CHECK_VALUE(std::isfinite(epsilon), "metakernels.reptile_update: epsilon must be finite, got ", epsilon);
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor fast = fast_in.contiguous();
  at::Tensor out = at::empty_like(theta, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, theta.scalar_type(), "reptile_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernels::reptile_update<scalar_t, acc_t>(theta.data_ptr<scalar_t>(), fast.data_ptr<scalar_t>(), acc_t(epsilon),
                                             out.data_ptr<scalar_t>(), fast.size(0), fast.size(1), torch_threads());
  });
  return out;
}

void register_reptile_update_cpu(torch::Library& m) { m.impl("reptile_update", &reptile_update_cpu); }

}  // namespace metakernels
