// ops.cpp -- the one TORCH_LIBRARY(amid, m) block: the schema of every op, and the C++ API of
// ops.h, which calls through the dispatcher. Kernels are registered per backend at the bottom of
// cpu/amid_loss_cpu.cpp and cuda/amid_loss_cuda.cu; fake kernels and autograd live in
// amid/ops.py. The golden list of schemas is tests/op_schemas.txt.
#include "ops.h"
#include "checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace amid {

std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& row_weight, double alpha, double lam,
    std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("amid::amid_loss_fwd", "")
                       .typed<decltype(amid_loss_fwd)>();
  return op.call(student_logits, teacher_logits, row_weight, alpha, lam, divergence, order,
                 ab_alpha, ab_beta, temperature, detach_assistant, compute_grad);
}

at::Tensor amid_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                         const at::Tensor& teacher_logits,
                         const std::optional<at::Tensor>& row_weight, const at::Tensor& stats,
                         double alpha, double lam, std::string_view divergence,
                         std::string_view order, double ab_alpha, double ab_beta,
                         double temperature, bool detach_assistant) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("amid::amid_loss_bwd", "")
                       .typed<decltype(amid_loss_bwd)>();
  return op.call(grad_loss, student_logits, teacher_logits, row_weight, stats, alpha, lam,
                 divergence, order, ab_alpha, ab_beta, temperature, detach_assistant);
}

std::tuple<at::Tensor, at::Tensor> amid_loss_topk_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_tail_logmass, const std::optional<at::Tensor>& row_weight,
    std::string_view tail, double alpha, double lam, std::string_view divergence, std::string_view order,
    double ab_alpha, double ab_beta, double temperature, bool detach_assistant, bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("amid::amid_loss_topk_fwd", "")
                       .typed<decltype(amid_loss_topk_fwd)>();
  return op.call(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail, alpha,
                 lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, compute_grad);
}

at::Tensor amid_loss_topk_bwd(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
                              const std::optional<at::Tensor>& teacher_tail_logmass,
                              const std::optional<at::Tensor>& row_weight, std::string_view tail, double alpha,
                              double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                              double ab_beta, double temperature, bool detach_assistant) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("amid::amid_loss_topk_bwd", "")
                       .typed<decltype(amid_loss_topk_bwd)>();
  return op.call(grad_loss, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight,
                 tail, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant);
}

void scale_grad_(at::Tensor& grad, const at::Tensor& grad_loss) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("amid::scale_grad_", "")
                       .typed<void(at::Tensor&, const at::Tensor&)>();
  op.call(grad, grad_loss);
}

namespace {

// What this library was built with; read by amid.build_info(). The macros come from setup.py /
// CMakeLists.txt.
std::string build_info() {
  std::string s = "torch=";
#ifdef AMID_TORCH_VERSION
  s += AMID_STR(AMID_TORCH_VERSION);
#else
  s += "unknown";
#endif
#ifdef AMID_WITH_CUDA
  s += ";cuda=1;cuda_archs=";
#ifdef AMID_CUDA_ARCHS
  s += AMID_STR(AMID_CUDA_ARCHS);
#else
  s += "unknown";
#endif
#else
  s += ";cuda=0;cuda_archs=";
#endif
  s += ";cpu_isa=" + cpu_loop_isa();
#ifdef AMID_CPU_TARGET
  s += ";cpu_isa_forced=1";
#else
  s += ";cpu_isa_forced=0";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(amid, m) {
  // Per-row AMiD loss, optionally with the gradient written in the same pass over the logits.
  //   student_logits, teacher_logits: [N, V], same dtype (f16/bf16/f32/f64), unit stride along V.
  //   row_weight: [N] (float32; float64 for float64 logits) or None (= 1). Rows with weight 0
  //     are skipped: loss 0, gradient 0, logits not read.
  //   order: 'pr', 'qr', 'rp', 'rq', or 'jsd' = lam D(p||r) + (1 - lam) D(q||r) in one pass.
  //   Returns loss [N] = row_weight * L_n, stats [N, 8] (amid_math.h: kNumStats) for amid_loss_bwd,
  //   grad [N, V] = d(sum loss)/d student_logits in the logits dtype if compute_grad, else [0].
  m.def(
      "amid_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor? row_weight, "
      "float alpha, float lam, str divergence, str order, float ab_alpha, float ab_beta, "
      "float temperature, bool detach_assistant, bool compute_grad) "
      "-> (Tensor loss, Tensor stats, Tensor grad)");
  // Gradient of sum_n grad_loss_n * loss_n w.r.t. student_logits, recomputed in one pass from the
  // logits and the stats of amid_loss_fwd (the path when the forward stored no gradient).
  m.def(
      "amid_loss_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, "
      "Tensor? row_weight, Tensor stats, float alpha, float lam, str divergence, str order, "
      "float ab_alpha, float ab_beta, float temperature, bool detach_assistant) -> Tensor");
  // In place grad[n, :] *= grad_loss[n]; rows whose grad_loss is exactly 1 are not touched, so
  // applying grad_output to a gradient written in the forward costs nothing in the common case.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");
  // AMiD against a sparse (top-k) teacher (docs/topk.md), gradient optionally in the same pass.
  //   student_logits: [N, V] (f16/bf16/f32/f64, unit stride along V).
  //   teacher_logprobs: [N, k] teacher log-probabilities, 1 <= k <= V, in the loss dtype (float32;
  //     float64 for float64 logits). teacher_indices: [N, k] int32/int64, distinct per row, in [0, V)
  //     (checked while the row is read: an error names the row).
  //   teacher_tail_logmass: [N] log of the teacher's mass outside its top-k (tail 'bucket' only;
  //     None = log(1 - sum exp(teacher_logprobs))). row_weight: as in amid_loss_fwd (0 = skipped row).
  //   tail: 'renorm' (the teacher renormalised on its top-k: the dense loss with -inf outside) or
  //     'bucket' (k + 1 bins, the top-k tokens and one tail bin; temperature must be 1).
  //   Returns loss [N] = row_weight * L_n and grad [N, V] = d(sum loss)/d student_logits in the
  //   logits dtype if compute_grad, else [0].
  m.def(
      "amid_loss_topk_fwd(Tensor student_logits, Tensor teacher_logprobs, Tensor teacher_indices, "
      "Tensor? teacher_tail_logmass, Tensor? row_weight, str tail, float alpha, float lam, str divergence, "
      "str order, float ab_alpha, float ab_beta, float temperature, bool detach_assistant, bool compute_grad) "
      "-> (Tensor loss, Tensor grad)");
  // Gradient of sum_n grad_loss_n * loss_n of amid_loss_topk_fwd w.r.t. student_logits, recomputed
  // from the inputs (the path when the forward stored no gradient).
  m.def(
      "amid_loss_topk_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logprobs, "
      "Tensor teacher_indices, Tensor? teacher_tail_logmass, Tensor? row_weight, str tail, float alpha, "
      "float lam, str divergence, str order, float ab_alpha, float ab_beta, float temperature, "
      "bool detach_assistant) -> Tensor");
  // Vocab-parallel partial rows (amid/parallel.py; kernels: cpu/amid_loss_cpu.cpp). The logits are a
  // slice [N, V_r] of the vocabulary; each op returns per-row partial states in float64 that merge
  // across slices (ranks) with max and sum; row_weight as in amid_loss_fwd (rows of weight 0 are
  // not read). R1: [N, 5] = (t_max, sum e^(t/T - t_max), s_max, sum e^(s/T - s_max), bad).
  m.def("amid_partial_lse(Tensor student_logits, Tensor teacher_logits, Tensor? row_weight, float temperature) "
        "-> Tensor");
  // R2, given stats [N, kNumStats] float64 holding the merged A, B (other columns unread):
  //   [N, 3] = (lt_max, sum e^(lt - lt_max), sum (r~ - o)).
  m.def(
      "amid_partial_mix(Tensor student_logits, Tensor teacher_logits, Tensor? row_weight, Tensor stats, "
      "float alpha, float lam, str divergence, str order, float ab_alpha, float ab_beta, float temperature, "
      "bool detach_assistant) -> Tensor");
  // R3, given stats [N, kNumStats] float64 holding the merged A, B, Z: the row sums
  //   [N, 8] = (L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1) (the last three kl only, else 0).
  m.def(
      "amid_partial_sums(Tensor student_logits, Tensor teacher_logits, Tensor? row_weight, Tensor stats, "
      "float alpha, float lam, str divergence, str order, float ab_alpha, float ab_beta, float temperature, "
      "bool detach_assistant) -> Tensor");
  // "torch=<version>;cuda=<0|1>;cuda_archs=<sm_80/sm_90a...>;cpu_isa=<x86-64-v4|x86-64-v3|baseline>;
  // cpu_isa_forced=<0|1>": how this library was built (and which clone of the CPU loops runs here).
  m.def("_build_info() -> str", &build_info);
}

}  // namespace amid
