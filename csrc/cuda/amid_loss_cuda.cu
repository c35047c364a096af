// amid_loss_cuda.cu -- CUDA kernels of the AMiD loss: the same math as the CPU kernels
// (../amid_math.h per element, ../amid_online.h for the row reductions in online form).
//
// One row = one CTA, or (sm_90+) one thread-block cluster of C CTAs that split the row into C
// slices. Per row:
//   R1  online log-sum-exp of t/T and s/T (+ NaN / +inf check)  -> A, B      (CTA / cluster reduce)
//   R2  lt = log r~, w per element; online Z = LSE(lt) and the loss-specific rescaled sums
//                                                                -> Z, L, S_G, K
//   R3  (rare rows: finite logits, and the closing formulas of R2 would lose too much; amid_online.h:
//       cond_of) with Z known, the row sums from each element's terms   -> L, S_G, K
//   W   (compute_grad) the gradient row, written once.
// Two ways to read the row in the three passes:
//   * resident: each CTA copies its slice of t and s into shared memory (16-byte loads), running
//     R1 on the loaded registers, and R2 / W read shared memory: the logits are read from device
//     memory once, so forward + backward moves the 6 bytes / element (bf16) floor. Run with
//     AMID_CUDA_PATH=resident (on an H200 it was slower than streaming at every shape measured:
//     amid_loss_kernels.cuh, launch_fwd_mode) when a slice fits the shared-memory budget
//     (kResidentBudget, else the device's opt-in limit minus the static size) with a cluster of at
//     most 8 (16 non-portable) CTAs, or on sm_80 the whole row in one CTA; the launch passes the
//     cluster size in, the kernel traps on a mismatch (code built without clusters, e.g. JIT from
//     sm_80 PTX, never gets a cluster). The
//     power-mean kernels of a single order keep R2's term per element beside the slice for W
//     (RowArgs::stash); the 16-bit alpha-beta qr / rq ones also q^g, and q in place of the logits,
//     so that their rare passes after R2 (the exact pass, R2's rerun) read the row from device memory;
//   * streaming (the default): the three passes read device memory (one CTA per row; the re-reads
//     partly hit L2).
// Rows whose weight is 0 are skipped (no read; zero gradient). Loss and stats in fp32 (fp64 for
// fp64 inputs), math in fp32 (fp64), gradient in the input dtype. 64-bit row offsets, any row
// stride. No fast-math; the math library's expf / log1pf.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "../amid_math.h"
#include "../checks.h"
#include "amid_loss_kernels.cuh"

namespace amid {
namespace cuda_impl {

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The kernels are compiled in amid_loss_<dtype>.cu.
AMID_EXTERN_LAUNCHERS(c10::BFloat16)
AMID_EXTERN_LAUNCHERS(c10::Half)
AMID_EXTERN_LAUNCHERS(float)
AMID_EXTERN_LAUNCHERS(double)

}  // namespace cuda_impl

namespace {

using namespace cuda_impl;

// grad[n, :] *= grad_loss[n], leaving rows whose factor is exactly 1 untouched.
template <typename scalar_t, typename loss_t>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(scalar_t* grad, const loss_t* grad_loss, int64_t N,
                                                              int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const loss_t f = grad_loss[row];
    if (f == loss_t(1)) continue;
    const acc_t fa = acc_t(f);
    // 16-byte loads and stores between a scalar head and tail (utils.cuh: map_vec).
    map_vec(grad + row * V, V, [fa](scalar_t x) { return scalar_t(acc_t(x) * fa); });
  }
}

// ------------------------------------------------------------------------------------------------
// Host wrappers

// The kernels' view of the inputs (both logits with their row strides, the row weights, the sizes);
// the outputs stay null for the caller to set.
template <typename scalar_t, typename acc_t>
RowArgs<scalar_t, acc_t> input_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                    const at::Tensor& weight) {
  RowArgs<scalar_t, acc_t> a{};
  a.t = teacher_logits.const_data_ptr<scalar_t>();
  a.s = student_logits.const_data_ptr<scalar_t>();
  a.row_weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  a.N = student_logits.size(0), a.V = student_logits.size(1);
  a.ldt = teacher_logits.stride(0), a.lds = student_logits.stride(0);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& row_weight,
    double alpha, double lam, std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_fwd";
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const auto ldtype = loss_dtype(student_logits.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor loss = at::empty({N}, student_logits.options().dtype(ldtype));
  at::Tensor stats = at::empty({N, kNumStats}, student_logits.options().dtype(ldtype));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student_logits.options()) : at::empty({0}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    auto a = input_args<scalar_t, acc_t>(student_logits, teacher_logits, weight);
    a.grad = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    a.loss = loss.data_ptr<acc_t>();
    a.stats = stats.data_ptr<acc_t>();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
      launch_fwd<scalar_t, decltype(dc)::value, decltype(oc)::value>(a, P, stream);
    });
  });
  return {loss, stats, grad};
}

at::Tensor amid_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const std::optional<at::Tensor>& row_weight,
                              const at::Tensor& stats, double alpha, double lam, std::string_view divergence,
                              std::string_view order, double ab_alpha, double ab_beta, double temperature,
                              bool detach_assistant) {
  constexpr const char* op = "amid_loss_bwd";
  check_bwd_args(op, grad_loss, student_logits, teacher_logits, row_weight, stats);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  at::Tensor gl = grad_loss.contiguous(), st = stats.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    auto a = input_args<scalar_t, acc_t>(student_logits, teacher_logits, weight);
    a.grad = grad.data_ptr<scalar_t>();
    a.grad_loss = gl.const_data_ptr<acc_t>();
    a.stats = const_cast<acc_t*>(st.const_data_ptr<acc_t>());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
      launch_bwd<scalar_t, decltype(dc)::value, decltype(oc)::value>(a, P, stream);
    });
  });
  return grad;
}

void scale_grad_cuda_(at::Tensor& grad, const at::Tensor& grad_loss) {
  constexpr const char* op = "scale_grad_";
  check_scale_grad_args(op, grad, grad_loss);
  const int64_t N = grad.size(0), V = grad.size(1);
  if (N == 0 || V == 0) return;
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  at::Tensor gl = grad_loss.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda_", [&] {
    using loss_t = at::opmath_type<scalar_t>;
    const int64_t blocks = std::min<int64_t>(N, int64_t(sm_count()) * 8);
    scale_grad_kernel<scalar_t, loss_t>
        <<<unsigned(blocks), kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), gl.const_data_ptr<loss_t>(), N, V);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY_IMPL(amid, CUDA, m) {
  m.impl("amid_loss_fwd", &amid_loss_fwd_cuda);
  m.impl("amid_loss_bwd", &amid_loss_bwd_cuda);
  m.impl("scale_grad_", &scale_grad_cuda_);
}

}  // namespace amid
