// test_kernels_on_host.cpp -- the CUDA forward and backward kernels' own source (csrc/cuda/amid_loss_kernels.cuh),
// compiled for the host and run here, against the CPU op in float64.
//
// The machines that build and test amid have no GPU, so the kernels' code paths (the row loop, R1 / R2 / R3 / W, the
// resident row slice and R2's kept terms, the row constants that thread 0 hands to its CTA, the fills of bad and
// ignored rows, the vector loads and stores and their scalar heads and tails) would otherwise run only on a lent one.
// Here one CTA at a time runs with its 256 threads as std::threads: __syncthreads and __syncwarp are barriers,
// __shfl_xor_sync goes through memory between two warp barriers, __shared__ variables are statics (one CTA at a time)
// and the dynamic shared memory one buffer. What this cannot show: the cluster exchange (cluster_size() is 1 off the
// GPU, so a resident CTA holds its whole row), races and the memory model (bench/gpu_check.sh runs compute-sanitizer),
// the approximate instructions' errors (the host runs exp2f / log2f; test_amid_cpp.cpp emulates those) and speed.
#define AMID_KERNELS_ON_HOST 1

#include <cuda_runtime.h>  // (host_defines.h, the vector types)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

// ---- the CUDA built-ins the kernels use, for host threads -------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim, gridDim;

namespace khost {
constexpr int kMaxThreads = 256;
inline std::barrier<>* cta_barrier = nullptr;
inline std::barrier<>* warp_barrier[kMaxThreads / 32] = {};
inline unsigned char shfl_slot[kMaxThreads][16];
alignas(128) inline unsigned char dyn_smem[1 << 20];
[[noreturn]] inline void trap(const char* file, int line) {
  std::fprintf(stderr, "kernel trap at %s:%d\n", file, line);
  std::abort();
}
}  // namespace khost

#define __trap() khost::trap(__FILE__, __LINE__)
#define AMID_DYNAMIC_SHARED(name) unsigned char* const name = khost::dyn_smem

inline void __syncthreads() { khost::cta_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { khost::warp_barrier[threadIdx.x / 32]->arrive_and_wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= 16, "__shfl_xor_sync: at most 16 bytes");
  const unsigned me = threadIdx.x, other = (me & ~31u) | ((me & 31u) ^ unsigned(offset));
  std::memcpy(khost::shfl_slot[me], &v, sizeof(T));
  __syncwarp();
  T r;
  std::memcpy(&r, khost::shfl_slot[other], sizeof(T));
  __syncwarp();
  return r;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}

#include "checks.h"
#include "cuda/amid_loss_kernels.cuh"
#include "ops.h"

using namespace amid;
using namespace amid::cuda_impl;

static int failures = 0, cases = 0;

// Runs body() as `grid` CTAs of kThreads threads, one CTA after another (the kernels' CTAs are independent off a
// cluster). A thread that returns drops out of the barriers, as an exited GPU thread does.
template <typename F>
static void launch(unsigned grid, F&& body) {
  static_assert(kThreads <= khost::kMaxThreads, "launch: kThreads");
  gridDim = dim3(grid), blockDim = dim3(kThreads);
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> cta(kThreads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (int w = 0; w < kThreads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    khost::cta_barrier = &cta;
    for (int w = 0; w < kThreads / 32; ++w) khost::warp_barrier[w] = warps[w].get();
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < unsigned(kThreads); ++i) {
      threads.emplace_back([&, i] {
        threadIdx = make_uint3(i, 0, 0), blockIdx = make_uint3(b, 0, 0);
        body();
        khost::warp_barrier[i / 32]->arrive_and_drop();
        khost::cta_barrier->arrive_and_drop();
      });
    }
    for (auto& t : threads) t.join();
  }
}

struct Case {
  const char* div;
  const char* order;
  double alpha, lam;
  double T = 1.0;
};

// A batch of rows that visits the kernels' row kinds: ordinary rows (bounded, near gaps), a row of wide logits (far
// gaps), a row with -inf in the teacher (a top-k teacher's mask) and one in the student, a row of logits ~1e4 (in
// 16-bit dtypes past the raw logit gap's 2048: the general policy), an ignored row (weight 0) and a NaN row. V is not
// a multiple of the vector width, so that the rows start at different misalignments, which the gradient's rows share:
// the vector loads and stores between scalar heads and tails. Strided: the logits are views into rows 5 elements
// longer, at offset 1, so that their misalignment differs from the gradient's: every element through the scalar path.
struct Batch {
  int64_t N = 8, V = 1003, ld;
  at::Tensor t, s, w;  // the logits [N, V] (rows ld apart), row weights
};

static Batch make_batch(at::ScalarType dtype, uint64_t seed, bool strided) {
  Batch b;
  b.ld = strided ? b.V + 5 : b.V;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  at::Tensor t = at::empty({b.N, b.ld}, at::kDouble), s = at::empty({b.N, b.ld}, at::kDouble);
  double* tp = t.data_ptr<double>();
  double* sp = s.data_ptr<double>();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < b.N; ++r) {
    const double scale = r == 1 ? 25.0 : 3.0;
    for (int64_t v = 0; v < b.ld; ++v) {
      const double x = scale * nd(rng);
      tp[r * b.ld + v] = x;
      sp[r * b.ld + v] = x * 0.8 + 0.6 * scale * nd(rng);  // a student correlated with its teacher
    }
  }
  for (int64_t v = 0; v < b.V; v += 7) tp[2 * b.ld + v] = -inf;    // row 2: a masked teacher
  for (int64_t v = 3; v < b.V; v += 11) sp[3 * b.ld + v] = -inf;   // row 3: a masked student
  for (int64_t v = 0; v < b.ld; ++v) tp[4 * b.ld + v] *= 1e3, sp[4 * b.ld + v] *= 1e3;  // row 4: logits ~1e4
  sp[6 * b.ld + 17] = std::numeric_limits<double>::quiet_NaN();    // row 6: NaN
  b.t = strided ? t.to(dtype).narrow(1, 1, b.V) : t.to(dtype);
  b.s = strided ? s.to(dtype).narrow(1, 1, b.V) : s.to(dtype);
  b.w = at::ones({b.N}, at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  b.w[5] = 0.0;  // row 5: ignored
  b.w[7] = 0.5;
  return b;
}

// max |got - want| over max(max |want|, floor), in float64 (tests/utils.py: rowwise_err, for one row), less the
// output dtype's spacing near zero (`quantum`: fp16's subnormals are 2^-24 apart; a tiny loss's gradient lies there).
// NaN where got has a NaN or inf that want has not (a NaN poison left in place: an element no thread wrote).
static double row_err(const at::Tensor& got, const at::Tensor& want, double floor, double quantum) {
  const double worst = (got - want).abs().max().item<double>();  // (NaN if any element's difference is)
  if (!std::isfinite(worst)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(0.0, worst - quantum) / std::max(want.abs().max().item<double>(), floor);
}

// The kernel's forward (with the gradient) and backward on the host, for one path (resident or streaming), compared
// with the CPU op on the same rounded logits in float64.
template <typename scalar_t, Divergence D, Order O>
static void run_case(const Case& c, at::ScalarType dtype, bool resident, int stash, bool bounded_ok, bool strided) {
  using acc_t = at::opmath_type<scalar_t>;
  char name[160];
  std::snprintf(name, sizeof(name), "%s/%s a=%g lam=%g T=%g %s %s stash=%d bounded=%d%s", c.div, c.order, c.alpha,
                c.lam, c.T, c10::toString(dtype), resident ? "resident" : "stream", stash, int(bounded_ok),
                strided ? " strided" : "");
  // AMID_KERNELS_ON_HOST_FILTER: only the cases whose name holds it (a developer's rerun of one case)
  const char* only = std::getenv("AMID_KERNELS_ON_HOST_FILTER");
  if (only && !std::strstr(name, only)) return;
  ++cases;
  const Batch b = make_batch(dtype, std::hash<std::string>{}(name), strided);  // (a batch of its own per case)
  const auto P = make_params<acc_t>("test", c.alpha, c.lam, c.div, c.order, 0.2, 0.7, c.T, false);
  const bool power = P.mode == MixMode::kPower;
  const auto ldtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::full({b.N}, -7.0, ldtype), stats = at::full({b.N, kNumStats}, -7.0, ldtype);
  at::Tensor grad = at::full({b.N, b.V}, std::numeric_limits<double>::quiet_NaN(), dtype);  // (poisoned)
  RowArgs<scalar_t, acc_t> a{};
  a.t = b.t.const_data_ptr<scalar_t>(), a.s = b.s.const_data_ptr<scalar_t>();
  a.grad = grad.data_ptr<scalar_t>();
  a.row_weight = b.w.const_data_ptr<acc_t>();
  a.loss = loss.data_ptr<acc_t>(), a.stats = stats.data_ptr<acc_t>();
  a.N = b.N, a.V = b.V, a.ldt = b.t.stride(0), a.lds = b.s.stride(0);
  a.cluster = 1;
  a.stash = stash;
  a.bounded_ok = bounded_ok && !(power && P.lam_tiny);
  a.prefetch = true;
  const unsigned grid = 2;  // two CTAs, each every other row
  a.row_step = grid;
  if (resident) {
    a.slice_cap = int(resident_slice_cap<scalar_t>(b.V, 1));
    if (resident_bytes<scalar_t, acc_t>(b.V, 1, stash) > int64_t(sizeof(khost::dyn_smem))) {
      std::fprintf(stderr, "run_case: the row slice does not fit the host's shared memory\n");
      std::abort();
    }
  }
  auto fwd = [&](auto resident_c) {  // (std::true_type: the resident kernel)
    if (power) {
      amid_fwd_kernel<scalar_t, D, O, decltype(resident_c)::value, true>(a, P);
    } else {
      amid_fwd_kernel<scalar_t, D, O, decltype(resident_c)::value, false>(a, P);
    }
  };
  if (resident) {
    launch(grid, [&] { fwd(std::true_type{}); });
  } else {
    launch(grid, [&] { fwd(std::false_type{}); });
  }
  // The backward kernel from the forward's stats, with a factor per row.
  at::Tensor gl = at::linspace(0.5, 2.0, b.N, ldtype);
  at::Tensor grad_b = at::full({b.N, b.V}, std::numeric_limits<double>::quiet_NaN(), dtype);
  RowArgs<scalar_t, acc_t> ab = a;
  ab.grad = grad_b.data_ptr<scalar_t>();
  ab.grad_loss = gl.const_data_ptr<acc_t>();
  launch(grid, [&] {
    if (power) {
      amid_bwd_kernel<scalar_t, D, O, true>(ab, P);
    } else {
      amid_bwd_kernel<scalar_t, D, O, false>(ab, P);
    }
  });

  // The reference: the CPU op in float64 on the same rounded logits.
  const at::Tensor t64 = b.t.to(at::kDouble), s64 = b.s.to(at::kDouble), w64 = b.w.to(at::kDouble);
  auto [rl, rst, rg] = amid_loss_fwd(s64, t64, w64, c.alpha, c.lam, c.div, c.order, 0.2, 0.7, c.T, false, true);
  // Budgets as the Python suite's (tests/utils.py, tests/test_cuda.py): the loss within 1e-4 relative and 1e-5
  // absolute, the gradient per row within issue 9's float32 budget (1e-4), bf16's 1e-2, fp16's 2e-3 of max(its
  // largest element, 1e-6, max_v q_v max(|K|, |L|)): every element is q_v (u_v - K), u_v of the size of the row's
  // loss L, so where one nearly cancels, its rounding is that of terms of that size (tests/utils.py:
  // grad_terms_scale, with |L| for the cheap modes, where K is 0: kl/rp at lam = 0, rows of huge logits, L ~ 1e3).
  const bool f64 = dtype == at::kDouble;  // (float64: tests/utils.py's float64 budgets)
  const double loss_rtol = f64 ? 1e-9 : 1e-4, loss_atol = f64 ? 1e-11 : 1e-5;
  const double grad_tol = f64 ? 1e-9 : dtype == at::kBFloat16 ? 1e-2 : (dtype == at::kHalf ? 2e-3 : 1e-4);
  const at::Tensor unweighted = (rl / w64).nan_to_num(0.0, 0.0, 0.0).abs();  // (0 where the weight is)
  const at::Tensor terms =
      std::get<0>(at::softmax(s64 / c.T, -1).max(-1)) * at::maximum(rst.select(1, 4).abs(), unweighted);
  const at::Tensor gl64 = gl.to(at::kDouble);
  const at::Tensor l64 = loss.to(at::kDouble), g64 = grad.to(at::kDouble), gb64 = grad_b.to(at::kDouble);
  for (int64_t r = 0; r < b.N; ++r) {
    const double want = rl[r].item<double>(), got = l64[r].item<double>();
    bool ok;
    double err = 0, gerr = 0, berr = 0;
    if (std::isnan(want)) {
      ok = std::isnan(got) && g64[r].isnan().all().item<bool>() && gb64[r].isnan().all().item<bool>();
    } else {
      err = std::fabs(got - want) / (loss_atol + loss_rtol * std::fabs(want));
      const double floor = std::max(1e-6, terms[r].item<double>());
      const double quantum = dtype == at::kHalf ? std::ldexp(1.0, -24) : 0.0;
      gerr = row_err(g64[r], rg[r], floor, quantum) / grad_tol;
      berr = row_err(gb64[r], rg[r] * gl64[r], floor * gl64[r].item<double>(), quantum) / grad_tol;
      ok = err <= 1 && gerr <= 1 && berr <= 1;  // (false for NaN)
    }
    if (!ok) {
      ++failures;
      const int64_t v = (g64[r] - rg[r]).abs().nan_to_num(1e300).argmax().item<int64_t>();
      std::fprintf(stderr, "  worst gradient element %lld: %.9g, want %.9g; t %.9g s %.9g\n", (long long)v,
                   g64[r][v].item<double>(), rg[r][v].item<double>(), t64[r][v].item<double>(),
                   s64[r][v].item<double>());
      std::fprintf(stderr, "FAILED %s row %lld: loss %.9g want %.9g; error / allowance: loss %.2g, grad %.2g, "
                   "bwd grad %.2g\n", name, (long long)r, got, want, err, gerr, berr);
    }
  }
}

template <typename scalar_t, Divergence D, Order O>
static void run_paths(const Case& c, at::ScalarType dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto P = make_params<acc_t>("test", c.alpha, c.lam, c.div, c.order, 0.2, 0.7, c.T, false);
  const bool power = P.mode == MixMode::kPower;
  run_case<scalar_t, D, O>(c, dtype, false, 0, true, false);
  // every row under the general policy (AMID_CUDA_BOUNDED=0), strided rows
  run_case<scalar_t, D, O>(c, dtype, false, 0, false, true);
  // The resident kernel with each kept-term level its launcher may choose (RowArgs::stash); strided rows at 0.
  const int top = power && O != Order::kJSD ? (kept3_kernel<scalar_t, D, O>() ? 2 : 1) : 0;
  for (int stash = top; stash >= 0; --stash) run_case<scalar_t, D, O>(c, dtype, true, stash, true, stash == 0);
}

template <typename scalar_t, Divergence D>
static void run_orders(const char* div, at::ScalarType dtype, const Case& base) {
  Case c = base;
  c.div = div;
  c.order = "pr", run_paths<scalar_t, D, Order::kPR>(c, dtype);
  c.order = "qr", run_paths<scalar_t, D, Order::kQR>(c, dtype);
  c.order = "rp", run_paths<scalar_t, D, Order::kRP>(c, dtype);
  c.order = "rq", run_paths<scalar_t, D, Order::kRQ>(c, dtype);
  c.order = "jsd", run_paths<scalar_t, D, Order::kJSD>(c, dtype);
}

template <typename scalar_t>
static void run_dtype(at::ScalarType dtype) {
  // The power mean at the library's default alpha, at a general one under a narrow weight, and a cheap mode (lam = 0:
  // the mixture is a side itself), at T = 1 and 2.
  for (const Case& c : {Case{"", "", 0.5, 0.5}, Case{"", "", -0.3, 0.1, 2.0}, Case{"", "", 0.5, 0.0}}) {
    run_orders<scalar_t, Divergence::kKL>("kl", dtype, c);
    run_orders<scalar_t, Divergence::kAB>("ab", dtype, c);
  }
}

int main() {
  run_dtype<c10::BFloat16>(at::kBFloat16);
  run_dtype<c10::Half>(at::kHalf);
  run_dtype<float>(at::kFloat);
  run_dtype<double>(at::kDouble);
  std::printf("test_kernels_on_host: %d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
