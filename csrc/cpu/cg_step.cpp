// CPU kernel of metakernels::cg_step (math and pass structure in csrc/kernels/cg_step.h). A mutating op with
// no autograd: batched CG runs it under no_grad, one call per iteration.
#include "../kernels/cg_step.h"
#include "common.h"
#include "registrations.h"

namespace metakernels {

namespace {

constexpr const char* kOp = "cg_step";

// [first byte, one past the last byte) of the memory a tensor's elements occupy (conservative when strided).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d);
    if (extent > 0) hi += extent;
    else lo += extent;
  }
  const auto es = static_cast<int64_t>(t.element_size());
  return {base + lo * es, base + (hi + 1) * es};
}

// dtype_name: as Python spells it, so the message matches metakernels/_validation.py's.
void check_state(const at::Tensor& x, const char* name, const at::Tensor& t, at::ScalarType dtype,
                 const char* dtype_name, bool mutated) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "metakernels.cg_step: ", name, " must be a ", dtype_name,
                   " tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), "metakernels.cg_step: ", name, " must be [T] with T = ",
                    x.size(0), " (the rows of x), got shape ", shape_str(t));
  TORCH_CHECK_VALUE(t.device() == x.device(), "metakernels.cg_step: ", name, " is on ", t.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(!mutated || t.is_contiguous(), "metakernels.cg_step: ", name,
                    " must be contiguous (it is updated in place)");
}

}  // namespace

void cg_step_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& ap_in,
                 const at::Tensor& rs, const at::Tensor& status, const at::Tensor& iterations,
                 const at::Tensor& threshold_in, bool stop_on_negative_curvature) {
  check_task_batch(kOp, "x", x);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "metakernels.cg_step: x must be a float32 or float64 tensor, got dtype ", x.scalar_type());
  const std::pair<const char*, const at::Tensor*> vectors[] = {{"r", &r}, {"p", &p}, {"Ap", &ap_in}};
  for (const auto& [name, t] : vectors) {
    TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "metakernels.cg_step: ", name, " must have the shape of x ",
                      shape_str(x), ", got ", shape_str(*t));
    check_like(kOp, name, *t, "x", x);
  }
  const std::pair<const char*, const at::Tensor*> mutated[] = {{"x", &x}, {"r", &r}, {"p", &p}};
  for (const auto& [name, t] : mutated)
    TORCH_CHECK_VALUE(t->is_contiguous(), "metakernels.cg_step: ", name,
                      " must be contiguous (it is updated in place)");
  check_state(x, "rs", rs, at::kDouble, "torch.float64", true);
  check_state(x, "threshold", threshold_in, at::kDouble, "torch.float64", false);
  check_state(x, "status", status, at::kInt, "torch.int32", true);
  check_state(x, "iterations", iterations, at::kLong, "torch.int64", true);
  const std::pair<const char*, const at::Tensor*> all[] = {{"x", &x}, {"r", &r}, {"p", &p}, {"Ap", &ap_in}};
  for (size_t i = 0; i < 4; ++i) {
    for (size_t j = i + 1; j < 4; ++j) {
      const auto a = byte_span(*all[i].second), b = byte_span(*all[j].second);
      TORCH_CHECK_VALUE(!(a.first < b.second && b.first < a.second), "metakernels.cg_step: ", all[i].first, " and ",
                        all[j].first, " must not share memory");
    }
  }
  const at::Tensor ap = ap_in.contiguous();
  const at::Tensor threshold = threshold_in.contiguous();
  const auto rule = stop_on_negative_curvature ? kernels::CgCurvatureRule::kStop : kernels::CgCurvatureRule::kContinue;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cpu", [&] {
    kernels::cg_step<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                               ap.data_ptr<scalar_t>(), rs.data_ptr<double>(), status.data_ptr<int32_t>(),
                               iterations.data_ptr<int64_t>(), threshold.data_ptr<double>(), rule, x.size(0),
                               x.size(1), torch_threads());
  });
}

void register_cg_step_cpu(torch::Library& m) { m.impl("cg_step", &cg_step_cpu); }

}  // namespace metakernels
