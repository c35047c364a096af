// amid_loss_f64_ab.cu -- the AMiD kernels of the alpha-beta losses instantiated for double inputs (one file per dtype
// and divergence so that the CUDA build compiles them in parallel: amid_loss_kernels.cuh).
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {
AMID_INSTANTIATE_LAUNCHERS(double, kAB)
}  // namespace cuda_impl
}  // namespace amid
