// Helpers shared by the op bindings: argument checks with messages that name the argument (the Python
// reference and Triton paths raise the same messages from metakernels/_validation.py), and the thread
// count that follows torch.set_num_threads.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <sstream>
#include <string>

namespace metakernels {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// The ops accept floating dtypes only; kernels compute in the dtype's math type (float for bf16/half).
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "metakernels.", op, ": ", name,
                   " must be a floating-point tensor, got dtype ", t.scalar_type());
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "metakernels.", op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "metakernels.", op, ": ", name, " is on ", t.device(),
                    " but ", ref_name, " is on ", ref.device());
}

inline void check_task_batch(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, "metakernels.", op, ": ", name, " must be a 2-D [T, P] tensor, got shape ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.size(0) > 0, "metakernels.", op, ": ", name, " is an empty task batch (T = 0)");
  TORCH_CHECK_VALUE(t.size(1) > 0, "metakernels.", op, ": ", name, " has no parameters (P = 0)");
}

inline int torch_threads() { return at::get_num_threads(); }

}  // namespace metakernels
