// amid_loss_bf16.cu -- the AMiD kernels instantiated for c10::BFloat16 inputs (one file per dtype so the
// CUDA build compiles in parallel).
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {
AMID_INSTANTIATE_LAUNCHERS(c10::BFloat16)
}  // namespace cuda_impl
}  // namespace amid
