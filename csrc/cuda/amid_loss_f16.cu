// amid_loss_f16.cu -- the AMiD kernels instantiated for c10::Half inputs (one file per dtype so the
// CUDA build compiles in parallel).
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {
AMID_INSTANTIATE_LAUNCHERS(c10::Half)
}  // namespace cuda_impl
}  // namespace amid
