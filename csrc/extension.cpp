// The Python module metakernels._C. Importing it registers nothing: metakernels/_backend.py decides
// which CPU backend serves the ops (these C++ kernels, the Python references, or the Triton kernels in
// the interpreter for tests) and calls the functions below. Kernel registrations are owned by Library
// objects held here, so dropping one deregisters its kernels.
#include <torch/extension.h>

#include <memory>

#include "cpu/registrations.h"

namespace {

std::unique_ptr<torch::Library> g_cpu_kernels;
std::unique_ptr<torch::Library> g_autograd_kernels;

void register_cpu_kernels() {
  if (g_cpu_kernels) return;
  g_cpu_kernels = std::make_unique<torch::Library>(torch::Library::IMPL, "metakernels",
                                                   std::make_optional(c10::DispatchKey::CPU), __FILE__, __LINE__);
  metakernels::register_inner_step_cpu(*g_cpu_kernels);
  metakernels::register_reptile_update_cpu(*g_cpu_kernels);
  metakernels::register_task_linear_cpu(*g_cpu_kernels);
  metakernels::register_mlp_loss_grad_cpu(*g_cpu_kernels);
  metakernels::register_conv_block_cpu(*g_cpu_kernels);
  metakernels::register_pcgrad_cpu(*g_cpu_kernels);
  metakernels::register_cg_step_cpu(*g_cpu_kernels);
}

void unregister_cpu_kernels() { g_cpu_kernels.reset(); }

void register_autograd_kernels() {
  if (g_autograd_kernels) return;
  g_autograd_kernels = std::make_unique<torch::Library>(
      torch::Library::IMPL, "metakernels", std::make_optional(c10::DispatchKey::Autograd), __FILE__, __LINE__);
  metakernels::register_inner_step_autograd(*g_autograd_kernels);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metakernels C++ CPU kernels";
  m.def("register_cpu_kernels", &register_cpu_kernels, "Register the C++ CPU kernels of every metakernels op");
  m.def("unregister_cpu_kernels", &unregister_cpu_kernels, "Remove the C++ CPU kernels");
  m.def("register_autograd_kernels", &register_autograd_kernels, "Register the C++ autograd kernels");
  m.def("inner_step", &metakernels::inner_step_dispatch,
        "metakernels::inner_step through the dispatcher, without the boxed Python op call");
  m.def("openmp_enabled", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
