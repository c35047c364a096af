// amid_loss_bf16_kl.cu -- the AMiD kernels of the KL losses instantiated for c10::BFloat16 inputs (one file per dtype
// and divergence so that the CUDA build compiles them in parallel: amid_loss_kernels.cuh).
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {
AMID_INSTANTIATE_LAUNCHERS(c10::BFloat16, kKL)
}  // namespace cuda_impl
}  // namespace amid
