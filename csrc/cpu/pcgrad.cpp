// CPU kernels of metakernels::pcgrad (placeholder until the kernels land: registers nothing).
#include "registrations.h"

namespace metakernels {

void register_pcgrad_cpu(torch::Library& m) { (void)m; }

}  // namespace metakernels
