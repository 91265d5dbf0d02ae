// CPU kernels of metakernels::task_linear (placeholder until the kernels land: registers nothing).
#include "registrations.h"

namespace metakernels {

void register_task_linear_cpu(torch::Library& m) { (void)m; }

}  // namespace metakernels
