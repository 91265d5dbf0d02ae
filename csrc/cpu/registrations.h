// Each op file registers its CPU kernels and (where it has one) its C++ autograd kernel on a Library that
// extension.cpp owns, so Python can choose at runtime which CPU backend serves the ops.
#pragma once
#include <torch/library.h>

namespace metakernels {
void register_inner_step_cpu(torch::Library& m);
void register_inner_step_autograd(torch::Library& m);
void register_reptile_update_cpu(torch::Library& m);
void register_task_linear_cpu(torch::Library& m);    // csrc/cpu/task_linear.cpp
void register_mlp_loss_grad_cpu(torch::Library& m);  // csrc/cpu/mlp_loss_grad.cpp
void register_conv_block_cpu(torch::Library& m);     // csrc/cpu/conv_block.cpp
void register_pcgrad_cpu(torch::Library& m);         // csrc/cpu/pcgrad.cpp
void register_cg_step_cpu(torch::Library& m);        // csrc/cpu/cg_step.cpp

// metakernels::inner_step called through the dispatcher from an unboxed C++ entry point: the same op,
// kernels, autograd and profiler record as torch.ops.metakernels.inner_step, minus the ~1-5 us of the
// boxed Python op call (argument parsing against the schema). The learners' hot path.
at::Tensor inner_step_dispatch(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                               const std::optional<at::Tensor>& segment_offsets,
                               const std::optional<at::Tensor>& theta0, double prox, double weight_decay);
}  // namespace metakernels
