// amid_loss_f64.cu -- the AMiD kernels instantiated for double inputs (one file per dtype so the
// CUDA build compiles in parallel).
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {
AMID_INSTANTIATE_LAUNCHERS(double)
}  // namespace cuda_impl
}  // namespace amid
