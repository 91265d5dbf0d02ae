// CPU kernels of metakernels::mlp_loss_grad (placeholder until the kernels land: registers nothing).
#include "registrations.h"

namespace metakernels {

void register_mlp_loss_grad_cpu(torch::Library& m) { (void)m; }

}  // namespace metakernels
