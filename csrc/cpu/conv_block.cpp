// CPU kernels of metakernels::conv_block (placeholder until the kernels land: registers nothing).
#include "registrations.h"

namespace metakernels {

void register_conv_block_cpu(torch::Library& m) { (void)m; }

}  // namespace metakernels
