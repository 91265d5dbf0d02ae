// Each op file registers its CPU kernels and (where it has one) its C++ autograd kernel on a Library that
// extension.cpp owns, so Python can choose at runtime which CPU backend serves the ops.
#pragma once
#include <torch/library.h>

namespace metakernels {
void register_inner_step_cpu(torch::Library& m);
void register_inner_step_autograd(torch::Library& m);
void register_reptile_update_cpu(torch::Library& m);
}  // namespace metakernels
