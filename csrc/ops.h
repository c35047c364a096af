// ops.h -- the C++ API of amid for libtorch users. Each function calls the registered op through
// the dispatcher, so CPU and CUDA tensors reach their kernels. Autograd is attached in Python
// (amid/ops.py); from C++, call amid_loss_fwd with compute_grad = true (or amid_loss_bwd) for the
// gradient. Shapes and semantics: see the schema comments in ops.cpp and the README.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace amid {

// Per-row AMiD loss of student logits [N, V] against teacher logits [N, V].
// Returns (loss [N], stats [N, 8], grad): loss_n = row_weight_n * L_n (0 where row_weight_n == 0,
// those rows are skipped); stats = [A_max, B_max, Z, S_G, K, A_log, B_log, Z2] per row (amid_math.h:
// kNumStats); grad = d(sum loss)/d student_logits
// ([N, V], logits dtype) when compute_grad, else an empty tensor. loss/stats are float32 (float64
// for float64 logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& row_weight, double alpha, double lam,
    std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad);

// Gradient of sum_n grad_loss_n * loss_n with respect to student_logits, recomputed from the
// logits and the stats of amid_loss_fwd. Returns [N, V] in the logits dtype.
at::Tensor amid_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                         const at::Tensor& teacher_logits,
                         const std::optional<at::Tensor>& row_weight, const at::Tensor& stats,
                         double alpha, double lam, std::string_view divergence,
                         std::string_view order, double ab_alpha, double ab_beta,
                         double temperature, bool detach_assistant);

// AMiD of student logits [N, V] against a sparse teacher: top-k log-probabilities [N, k] (loss dtype)
// at int32/int64 indices [N, k], with tail rule "renorm" or "bucket" (docs/topk.md; schema comment in
// ops.cpp). Returns (loss [N], grad [N, V] if compute_grad else empty). CPU only for now.
std::tuple<at::Tensor, at::Tensor> amid_loss_topk_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_tail_logmass, const std::optional<at::Tensor>& row_weight,
    std::string_view tail, double alpha, double lam, std::string_view divergence, std::string_view order,
    double ab_alpha, double ab_beta, double temperature, bool detach_assistant, bool compute_grad);

// Gradient of sum_n grad_loss_n * loss_n of amid_loss_topk_fwd, recomputed from the inputs.
at::Tensor amid_loss_topk_bwd(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
                              const std::optional<at::Tensor>& teacher_tail_logmass,
                              const std::optional<at::Tensor>& row_weight, std::string_view tail, double alpha,
                              double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                              double ab_beta, double temperature, bool detach_assistant);

// Which build of the CPU loops this process runs: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2 + FMA) or
// "baseline" (the loader's pick among the clones, or the one level of a -DAMID_CPU_TARGET build).
std::string cpu_loop_isa();

// In place: grad[n, :] *= grad_loss[n], skipping rows where grad_loss[n] == 1 (no host sync).
void scale_grad_(at::Tensor& grad, const at::Tensor& grad_loss);

}  // namespace amid
