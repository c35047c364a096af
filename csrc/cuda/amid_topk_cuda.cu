// amid_topk_cuda.cu -- CUDA kernels of the sparse-teacher AMiD ops amid_loss_topk_fwd / _bwd (math
// and gradients: docs/topk.md). The per-row results are the CPU kernel's (cpu/amid_loss_cpu.cpp,
// topk_row; read that first): the same element math (../amid_math.h), the row reductions in online
// form (../amid_online.h), the same tail rules, the same NaN rows.
//
// A row's teacher is k log-probabilities lp at distinct indices I. One CTA per row (grid-stride over
// rows); the row's indices are marked in a bitmap of V bits in shared memory (membership of a token
// in I is one shared-memory read), and the k teacher bins are read from device memory where needed
// (k is small next to V; the gathers s[I] hit L1 / L2 after the first pass). Per row:
//   renorm (the dense loss with teacher -inf outside I, at any temperature): every reduction and the
//     gradient run over two parts, the V - k tokens outside I (teacher -inf; visited with 16-byte
//     loads, the tokens in I skipped) and the k bins (lp_b / T, s_{i_b} / T):
//       R1 LseAcc -> A, B (+ the NaN / +inf check), R2 RowAcc -> Z, L, S_G, K, then the gradient
//       row: every position from the "outside" formula in one vectorised pass, then (after a CTA
//       barrier) the k positions in I overwritten with their bins' gradient;
//   bucket (k + 1 bins, T = 1): one pass over V for the student's tail bin c = LSE_{v not in I} s_v
//     (online; NaN when the row holds NaN or +inf anywhere, -inf when the tail is empty) and the
//     teacher's tail bin (the given log-mass, else log(1 - sum exp lp), in double as the CPU kernel);
//     R1 / R2 on the k + 1 bins; the gradient: G_tail * e^(s_v - c) at every position (0 when
//     c = -inf) in one vectorised pass, then the k positions in I overwritten with G_b.
// Ignored rows (weight 0) are not read (not even their indices) and get loss 0 and a zero gradient.
// Invalid rows (NaN / +inf logits, an all -inf side, alpha >= 1 with disjoint supports) get NaN as in
// the CPU kernel. Rows with an out-of-range or repeated index get NaN, and the smallest such row goes
// to a device flag that the host reads back once per call (one device-to-host copy, i.e. a stream
// sync) and turns into the CPU kernel's error for that row. While the stream is being captured into
// a CUDA graph the read-back is skipped (a sync is illegal there): such rows are then NaN, not an
// error.
//
// Math in fp32 (fp64 for fp64 inputs), loss in the loss dtype, gradient in the input dtype. The
// scaled logits saturate as in the CPU kernel (scale_logit). 64-bit row offsets, any row stride.
// V is limited by the bitmap: ceil(V / 32) * 4 bytes of shared memory (32 KB at V = 262144; the
// device's opt-in limit, ~227 KB on sm_90, allows V ~ 1.8M), checked with a clear error.
//
// tests/test_topk_cuda.py compares both ops with the CPU ones (run once, on an H200: README § GPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../amid_math.h"
#include "../amid_online.h"
#include "../checks.h"
#include "utils.cuh"

namespace amid {
namespace topk_cuda {

using namespace cuda_detail;
// No approximate instruction (PreciseMath): a bucket row's statistics come from its k + 1 bins, too few to average
// the approximate exponential's error out (in the C++ emulation of the float math, with R3 on every row, 9 bins had
// the gradient off by 2.8e-4 of its largest element with the approximate instructions, 7.8e-5 without; tests/cpp:
// the "bins" regimes), and this kernel is not the one tuned to the instruction.
using M = PreciseMath;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

template <typename T>
__device__ __forceinline__ T nan_v() {
  return std::numeric_limits<T>::quiet_NaN();
}

// x * scale, saturated at the type's largest magnitude instead of overflowing to +-inf (as the CPU
// kernel's scale_logit: a tiny temperature times a large finite logit stays finite).
template <typename T>
__device__ __forceinline__ T scale_logit(T x, T scale) {
  const T inf = std::numeric_limits<T>::infinity();
  const T y = x * scale;
  const bool over = (y == inf) | (y == -inf);
  const bool finite_x = (x < inf) & (x > -inf);
  return over & finite_x ? (y > T(0) ? std::numeric_limits<T>::max() : std::numeric_limits<T>::lowest()) : y;
}

// Everything the kernel needs besides the loss parameters.
template <typename scalar_t>
struct TopkArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* s;            // [N, V] student logits, row stride lds
  const acc_t* lp;              // [N, k] teacher log-probabilities, contiguous
  const void* idx;              // [N, k] teacher indices, contiguous int32 (idx64 false) or int64
  const acc_t* tail_logmass;    // [N] or nullptr (bucket: log(1 - sum exp lp))
  const double* weight;         // [N] or nullptr (= 1); 0: ignored row
  acc_t* loss;                  // [N], or nullptr (backward)
  scalar_t* grad;               // [N, V] contiguous, or nullptr
  unsigned long long* bad_row;  // [1]: the smallest row with an invalid index (initialised to ~0)
  int64_t N, V, k, lds;
  bool idx64;
  bool bucket;
};

__device__ __forceinline__ int64_t load_index(const void* p, bool idx64, int64_t i) {
  return idx64 ? reinterpret_cast<const int64_t*>(p)[i] : int64_t(reinterpret_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ bool marked(const uint32_t* bitmap, int64_t v) {
  return ((bitmap[v >> 5] >> (v & 31)) & 1u) != 0u;
}

// Calls f(i, sv[], n) for this thread's share of the row s[0, len), in chunks of kW = 16 /
// sizeof(scalar_t) elements read with one 16-byte load each (vec_ok; the unaligned head and the tail
// in scalar chunks, n = 1), else element by element. utils.cuh's visit_row for a single row.
template <typename scalar_t, typename F>
__device__ __forceinline__ void visit_one(const scalar_t* __restrict__ s, int64_t len, bool vec_ok, F&& f) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const int tid = threadIdx.x, nt = blockDim.x;
  int64_t head = len, nvec = 0;
  if (vec_ok) {
    head = vector_head(s, len);
    nvec = (len - head) / kW;
  }
  for (int64_t i = tid; i < head; i += nt) {
    scalar_t sv[1] = {s[i]};
    f(i, sv, std::integral_constant<int, 1>{});
  }
  const uint4* s4 = reinterpret_cast<const uint4*>(s + head);
  for (int64_t c = tid; c < nvec; c += nt) {
    const uint4 b = s4[c];
    const scalar_t* sv = reinterpret_cast<const scalar_t*>(&b);
    f(head + c * kW, sv, std::integral_constant<int, kW>{});
  }
  for (int64_t i = head + nvec * kW + tid; i < len; i += nt) {
    scalar_t sv[1] = {s[i]};
    f(i, sv, std::integral_constant<int, 1>{});
  }
}

// One element of R2 and of the gradient for loss (D, O): the dense kernels' shared element functions
// (amid_online.h: add_from_logits; amid_math.h: grad_from_logits; tf, sf: the scaled logits, the
// gradient before the weight * 1/T factor).
template <Divergence D, Order O, bool POWER, typename acc_t>
struct ElemMath {
  using Acc = typename RowAccOf<D, O, acc_t>::type;

  static __device__ __forceinline__ void add(Acc& acc, const LossParams<acc_t>& P, acc_t tf, acc_t sf,
                                             RowLse<acc_t> A, RowLse<acc_t> B, acc_t dAB) {
    add_from_logits<O, POWER, M>(acc, P, tf, sf, A, B, dAB);
  }

  static __device__ __forceinline__ acc_t grad(const LossParams<acc_t>& P, acc_t tf, acc_t sf, RowLse<acc_t> A,
                                               RowLse<acc_t> B, acc_t dAB, acc_t Z, acc_t Z2, acc_t S_G, acc_t K) {
    return grad_from_logits<D, O, POWER, M>(P, tf, sf, A, B, dAB, Z, Z2, S_G, K);
  }
};

// The bucket rule's student tail: the online LSE of the tokens outside I and the NaN / +inf flag of
// the whole row.
template <typename T>
struct TailAcc {
  OnlineLSE<T> tail;
  T bad = T(0);
};

template <typename T>
struct Scalar {
  T v;
};

// The row statistics R1 / R2 give (valid = false: the row is NaN).
template <typename acc_t>
struct RowStats {
  RowLse<acc_t> A, B;
  acc_t dAB, Z, Z2, L, S_G, K;
  bool valid;
};

// ------------------------------------------------------------------------------------------------
// The kernel: forward (loss, and the gradient when a.grad) and backward (a.loss == nullptr, weight =
// grad_loss * row_weight) alike. Launch bounds: for 16/32-bit inputs as the dense streaming kernel's
// (three kl CTAs or two ab CTAs per SM: <= 80 / 128 registers); float64 math needs about twice the
// registers (with those bounds every float64 variant spilled, up to 2.8 KB for ab/jsd; with two CTAs
// kl/jsd still did), so no minimum there (120-250 registers, one or two CTAs per SM). ptxas keeps
// every variant unspilled (checked with -Xptxas -v on sm_90a).
template <typename scalar_t, Divergence D>
constexpr int topk_min_blocks() {
  return std::is_same<scalar_t, double>::value ? 1 : (D == Divergence::kKL ? 3 : 2);
}

template <typename scalar_t, Divergence D, Order O, bool POWER>
__global__ void __launch_bounds__(kThreads, topk_min_blocks<scalar_t, D>())
    amid_topk_kernel(const TopkArgs<scalar_t> a, const LossParams<at::opmath_type<scalar_t>> P) {
  using acc_t = at::opmath_type<scalar_t>;
  using Lse = LseAcc<acc_t>;
  using EM = ElemMath<D, O, POWER, acc_t>;
  using Acc = typename EM::Acc;
  constexpr int kW = VecWidth<scalar_t>::value;
  // Reduction scratch as raw storage (the accumulators have member initialisers, which shared
  // variables cannot run); every slot is written before it is read.
  using LseP = typename Lse::Packed;  // (R1's state without its caches: amid_online.h, OnlineLSE::Packed)
  __shared__ __align__(16) unsigned char lse_mem[sizeof(LseP) * kWarps];
  __shared__ __align__(16) unsigned char acc_mem[sizeof(Acc) * kWarps];
  __shared__ __align__(16) unsigned char tail_mem[sizeof(TailAcc<acc_t>) * kWarps];
  __shared__ __align__(16) unsigned char dbl_mem[sizeof(Scalar<double>) * kWarps];
  __shared__ unsigned int s_flag;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  LseP* lse_scratch = reinterpret_cast<LseP*>(lse_mem);
  Acc* acc_scratch = reinterpret_cast<Acc*>(acc_mem);
  // The exact pass's reduction reuses acc_mem (static shared memory decides the CTAs per SM); block_reduce's
  // leading barrier orders its writes after the R2 reduction's reads.
  using Ex = typename ExactAccOf<D, O, acc_t>::type;
  static_assert(sizeof(Ex) <= sizeof(Acc), "amid_topk_kernel: the exact pass's scratch must fit R2's");
  Ex* ex_scratch = reinterpret_cast<Ex*>(acc_mem);
  TailAcc<acc_t>* tail_scratch = reinterpret_cast<TailAcc<acc_t>*>(tail_mem);
  Scalar<double>* dbl_scratch = reinterpret_cast<Scalar<double>*>(dbl_mem);
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem_raw);  // [ceil(V / 32)]: the current row's indices

  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t V = a.V, k = a.k;
  const acc_t invT = P.inv_temperature;
  const acc_t ninf = neg_inf<acc_t>();
  auto merge_lse = [](LseP& x, const LseP& y) { x.template merge<M>(y); };
  auto merge_acc = [&P](Acc& x, const Acc& y) { x.template merge<M>(P, y); };
  auto merge_ex = [](Ex& x, const Ex& y) { x.merge(y); };
  auto merge_tail = [](TailAcc<acc_t>& x, const TailAcc<acc_t>& y) {
    x.tail.template merge<M>(y.tail);
    x.bad = x.bad > y.bad ? x.bad : y.bad;
  };

  for (int64_t w = tid; w < (V + 31) / 32; w += nt) bitmap[w] = 0u;

  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const double wn = a.weight ? a.weight[row] : 1.0;
    scalar_t* g = a.grad ? a.grad + row * V : nullptr;
    if (wn == 0.0) {  // ignored row: not read
      if (g) fill_vec(g, V, scalar_t(0));
      if (a.loss && tid == 0) a.loss[row] = acc_t(0);
      continue;
    }
    const acc_t weight = acc_t(wn);
    const scalar_t* s = a.s + row * a.lds;
    const acc_t* lp = a.lp + row * k;
    const int64_t ib = row * k;

    // Mark the row's indices; an out-of-range or repeated one flags the row. (The barrier also
    // orders the previous row's unmarking before these marks, and s_flag's reset before its use.)
    if (tid == 0) s_flag = 0u;
    __syncthreads();
    for (int64_t b = tid; b < k; b += nt) {
      const int64_t i = load_index(a.idx, a.idx64, ib + b);
      if (i < 0 || i >= V) {
        atomicOr(&s_flag, 1u);
      } else {
        const uint32_t bit = 1u << (i & 31);
        if (atomicOr(&bitmap[i >> 5], bit) & bit) atomicOr(&s_flag, 1u);
      }
    }
    __syncthreads();
    const bool vec_w = g != nullptr && same_misalignment(s, g, sizeof(scalar_t));

    // The statistics of the row (R1, R2) on its two parts: the tokens outside I (renorm: teacher
    // -inf; bucket: none) and the bins (renorm: k; bucket: k + 1, the last the tail bins (tt, c)).
    const int64_t nbins = a.bucket ? k + 1 : k;
    acc_t c = ninf, tt = ninf;  // bucket: the tail bins (student, teacher)
    auto bin = [&](int64_t b, acc_t& tf, acc_t& sf) {
      if (b < k) {
        tf = scale_logit(lp[b], invT);
        sf = scale_logit(acc_t(s[load_index(a.idx, a.idx64, ib + b)]), invT);
      } else {
        tf = scale_logit(tt, invT);
        sf = scale_logit(c, invT);
      }
    };
    RowStats<acc_t> st{};
    st.valid = false;
    if (s_flag == 0u) {
      if (a.bucket) {
        // The student's tail bin (the CPU kernel: c from the masked row; NaN if the row holds NaN /
        // +inf anywhere, -inf when no tail token has mass) ...
        TailAcc<acc_t> ta;
        visit_one(s, V, true, [&](int64_t i, const scalar_t* sv, auto nc) {
#pragma unroll
          for (int j = 0; j < decltype(nc)::value; ++j) {
            const acc_t x = acc_t(sv[j]);
            ta.bad = x < std::numeric_limits<acc_t>::infinity() ? ta.bad : acc_t(1);
            if (!marked(bitmap, i + j)) ta.tail.template add<M>(x);
          }
        });
        ta = block_reduce<acc_t>(ta, tail_scratch, merge_tail);
        c = ta.bad != acc_t(0) ? nan_v<acc_t>() : (ta.tail.m == ninf ? ninf : ta.tail.m + ta.tail.template log_sum<M>());
        // ... and the teacher's: given, or log(1 - sum_b exp(lp_b)) in double (-inf when the top-k
        // hold all the mass, or more after rounding).
        if (a.tail_logmass) {
          tt = a.tail_logmass[row];
        } else {
          const double dinf = std::numeric_limits<double>::infinity();
          Scalar<double> mx{-dinf};
          for (int64_t b = tid; b < k; b += nt) {
            const double x = double(lp[b]);
            mx.v = x > mx.v ? x : mx.v;  // NaN skipped, as std::max in the CPU kernel
          }
          mx = block_reduce<double>(mx, dbl_scratch, [](Scalar<double>& x, const Scalar<double>& y) {
            x.v = y.v > x.v ? y.v : x.v;
          });
          double top = mx.v;
          if (mx.v > -dinf && mx.v < dinf) {
            Scalar<double> sum{0.0};
            for (int64_t b = tid; b < k; b += nt) sum.v += ::exp(double(lp[b]) - mx.v);
            sum = block_reduce<double>(sum, dbl_scratch, [](Scalar<double>& x, const Scalar<double>& y) { x.v += y.v; });
            top = mx.v + ::log(sum.v);
          }
          tt = acc_t(top < 0.0 ? ::log(-::expm1(top)) : (top >= 0.0 ? -dinf : nan_v<double>()));
        }
      }
      // R1: log-sum-exps and the validity check.
      Lse lse;
      if (!a.bucket) {
        visit_one(s, V, true, [&](int64_t i, const scalar_t* sv, auto nc) {
#pragma unroll
          for (int j = 0; j < decltype(nc)::value; ++j) {
            if (!marked(bitmap, i + j)) lse.template add<M>(ninf, scale_logit(acc_t(sv[j]), invT));
          }
        });
      }
      for (int64_t b = tid; b < nbins; b += nt) {
        acc_t tf, sf;
        bin(b, tf, sf);
        lse.template add<M>(tf, sf);
      }
      lse = Lse::unpack(block_reduce<acc_t>(lse.pack(), lse_scratch, merge_lse));
      if (!lse.invalid()) {
        st.A = RowLse<acc_t>{lse.t.m, lse.t.template log_sum<M>()};
        st.B = RowLse<acc_t>{lse.s.m, lse.s.template log_sum<M>()};
        st.dAB = row_lse_gap(st.A, st.B);
        // R2: the mixture per element; Z and the loss-specific sums.
        Acc acc;
        if (!a.bucket) {
          visit_one(s, V, true, [&](int64_t i, const scalar_t* sv, auto nc) {
#pragma unroll
            for (int j = 0; j < decltype(nc)::value; ++j) {
              if (!marked(bitmap, i + j)) EM::add(acc, P, ninf, scale_logit(acc_t(sv[j]), invT), st.A, st.B, st.dAB);
            }
          });
        }
        for (int64_t b = tid; b < nbins; b += nt) {
          acc_t tf, sf;
          bin(b, tf, sf);
          EM::add(acc, P, tf, sf, st.A, st.B, st.dAB);
        }
        acc = block_reduce<acc_t>(acc, acc_scratch, merge_acc);
        st.valid = acc.template close<M>(P, st.Z, st.Z2, st.L, st.S_G, st.K);  // false: the assistant is undefined
        // The bucket rule's bins with every logit finite: the dense kernels' exact pass R3 (amid_loss_kernels.cuh),
        // always (k + 1 elements: cheap next to the pass over V). The online closing formulas on so short a row
        // lost up to the whole loss at logit scale 12 in the C++ emulation of the float math (tests/cpp: the
        // "bins" regimes), and with R3 only where the loss's condition asks for it (the dense kernels' rule) they
        // left 4.9e-6 of the loss and 1.8e-4 of the gradient at scale 3, for 9.8e-7 and 7.8e-5 with R3 always.
        // renorm rows hold the teacher's -inf tail: the online sums, which are the more accurate ones there (as
        // in the dense kernels).
        if (a.bucket && st.valid && lse.bounded()) {
          const acc_t Wbar = acc.wbar();
          Ex ex;
          for (int64_t b = tid; b < nbins; b += nt) {
            acc_t tf, sf;
            bin(b, tf, sf);
            exact_from_logits<D, O, POWER, M>(ex, P, tf, sf, st.A, st.B, st.dAB, st.Z, st.Z2);
          }
          ex = block_reduce<acc_t>(ex, ex_scratch, merge_ex);
          ex.finalize(P, Wbar, st.L, st.S_G, st.K);
        }
      }
    }
    if (s_flag != 0u && tid == 0) atomicMin(a.bad_row, static_cast<unsigned long long>(row));
    if (a.loss && tid == 0) a.loss[row] = st.valid ? weight * st.L : nan_v<acc_t>();

    // The gradient row (chain rule through s/T: the 1/T factor).
    if (g) {
      const acc_t scale = weight * invT;
      if (!st.valid && (s_flag != 0u || !a.bucket)) {
        fill_vec(g, V, scalar_t(nan_v<acc_t>()));
      } else {
        // Every position from the rule outside I: renorm, the element gradient with teacher -inf;
        // bucket, the tail bin's G_tail * q_v / Q_tail = G_tail e^(s_v - c) (0 when c = -inf, i.e.
        // no tail token has mass; NaN everywhere when the bins are invalid, as the CPU kernel).
        acc_t g_tail = nan_v<acc_t>();
        if (a.bucket && st.valid) {
          acc_t tf, sf;
          bin(k, tf, sf);
          g_tail = scale * EM::grad(P, tf, sf, st.A, st.B, st.dAB, st.Z, st.Z2, st.S_G, st.K);
        }
        visit_one(s, V, vec_w, [&](int64_t i, const scalar_t* sv, auto nc) {
          constexpr int n = decltype(nc)::value;
          alignas(16) scalar_t out[kW];
#pragma unroll
          for (int j = 0; j < n; ++j) {
            acc_t v;
            if (a.bucket) {
              v = c == ninf ? acc_t(0) : g_tail * M::exp(acc_t(sv[j]) - c);
            } else {
              v = scale * EM::grad(P, ninf, scale_logit(acc_t(sv[j]), invT), st.A, st.B, st.dAB, st.Z, st.Z2, st.S_G,
                                   st.K);
            }
            out[j] = scalar_t(v);
          }
          store_chunk_global<n>(g, i, out);
        });
        // The k positions in I: their bins' gradient. The barrier orders these stores after the
        // pass above wrote the same positions (CTA-scope ordering of global stores).
        __syncthreads();
        for (int64_t b = tid; b < k; b += nt) {
          acc_t v = nan_v<acc_t>();
          if (st.valid) {
            acc_t tf, sf;
            bin(b, tf, sf);
            v = scale * EM::grad(P, tf, sf, st.A, st.B, st.dAB, st.Z, st.Z2, st.S_G, st.K);
          }
          g[load_index(a.idx, a.idx64, ib + b)] = scalar_t(v);
        }
      }
    }

    // Unmark: every thread is done with the bitmap (and with s_flag) after this barrier. Clearing
    // whole words is safe: every bit set in them is one of this row's indices.
    __syncthreads();
    for (int64_t b = tid; b < k; b += nt) {
      const int64_t i = load_index(a.idx, a.idx64, ib + b);
      if (i >= 0 && i < V) bitmap[i >> 5] = 0u;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers

// The largest dynamic shared memory the kernel may use on the current device (the opt-in limit minus
// its static shared memory), set once per (kernel, device) under a mutex (a process-wide attribute;
// see amid_loss_kernels.cuh: resident_info).
template <typename Kernel>
int max_dynamic_smem(Kernel kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int max_dyn = std::max(0, int(prop->sharedMemPerBlockOptin) - int(attr.sharedSizeBytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dyn));
  return cache.emplace(key, max_dyn).first->second;
}

template <typename scalar_t, Divergence D, Order O, bool POWER>
void launch(const char* op, const TopkArgs<scalar_t>& a, const LossParams<at::opmath_type<scalar_t>>& P,
            cudaStream_t stream) {
  auto kernel = amid_topk_kernel<scalar_t, D, O, POWER>;
  const int64_t smem = (a.V + 31) / 32 * int64_t(sizeof(uint32_t));
  const int max_dyn = max_dynamic_smem(kernel);
  AMID_CHECK(smem <= max_dyn, op, "expected a vocabulary of at most ", int64_t(max_dyn) * 8,
             " entries on this GPU (the CUDA kernel keeps a bitmap of each row's teacher indices in shared memory), "
             "but got V = ", a.V);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, size_t(smem)));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(a.N, int64_t(std::max(per_sm, 1)) * sms);
  kernel<<<unsigned(blocks), kThreads, size_t(smem), stream>>>(a, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by the forward (weight = row_weight; loss written, gradient if asked) and the backward
// (weight = grad_loss * row_weight, gradient only). `weight` is float64 (or undefined: all 1), as in
// the CPU kernel.
void topk_rows_cuda(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logprobs,
                    const at::Tensor& teacher_indices, const std::optional<at::Tensor>& tail_logmass,
                    const at::Tensor& weight, TopkTail tail, double alpha, double lam, std::string_view divergence,
                    std::string_view order, double ab_alpha, double ab_beta, double temperature,
                    bool detach_assistant, at::Tensor* loss, at::Tensor* grad) {
  const int64_t N = student_logits.size(0), V = student_logits.size(1), k = teacher_logprobs.size(1);
  at::Tensor lpc = teacher_logprobs.contiguous(), idxc = teacher_indices.contiguous();
  at::Tensor tlc = tail_logmass ? tail_logmass->contiguous() : at::Tensor();
  at::Tensor bad_row = at::full({1}, -1, student_logits.options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    TopkArgs<scalar_t> a{};
    a.s = student_logits.const_data_ptr<scalar_t>();
    a.lp = lpc.const_data_ptr<acc_t>();
    a.idx = idxc.const_data_ptr();
    a.tail_logmass = tlc.defined() ? tlc.const_data_ptr<acc_t>() : nullptr;
    a.weight = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
    a.loss = loss ? loss->data_ptr<acc_t>() : nullptr;
    a.grad = grad ? grad->data_ptr<scalar_t>() : nullptr;
    a.bad_row = reinterpret_cast<unsigned long long*>(bad_row.data_ptr<int64_t>());
    a.N = N, a.V = V, a.k = k, a.lds = student_logits.stride(0);
    a.idx64 = idxc.scalar_type() == at::kLong;
    a.bucket = tail == TopkTail::kBucket;
    dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
      constexpr Divergence DV = decltype(dc)::value;
      constexpr Order OV = decltype(oc)::value;
      if (P.mode == MixMode::kPower) {
        launch<scalar_t, DV, OV, true>(op, a, P, stream);
      } else {
        launch<scalar_t, DV, OV, false>(op, a, P, stream);
      }
    });
    launched = true;
  });
  if (!launched) return;
  // The index check's read-back (a stream sync), except while capturing a CUDA graph.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  const int64_t row = bad_row.item<int64_t>();
  if (row >= 0) {
    const at::Tensor r = idxc.select(0, row).to(at::kCPU).to(at::kLong).contiguous();
    check_topk_row_indices(op, r.const_data_ptr<int64_t>(), k, V, row);
    AMID_CHECK(false, op, "internal error: the CUDA kernel flagged row ", row, " of teacher_indices, whose values "
               "pass the check on the host");
  }
}

std::tuple<at::Tensor, at::Tensor> amid_loss_topk_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_tail_logmass, const std::optional<at::Tensor>& row_weight,
    std::string_view tail, double alpha, double lam, std::string_view divergence, std::string_view order,
    double ab_alpha, double ab_beta, double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_topk_fwd";
  const TopkTail tl = parse_tail(op, tail);
  check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tl,
                  temperature);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor loss = at::empty({N}, student_logits.options().dtype(loss_dtype(student_logits.scalar_type())));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student_logits.options()) : at::empty({0}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->to(at::kDouble).contiguous() : at::Tensor();
  topk_rows_cuda(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, weight, tl, alpha, lam,
                 divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, &loss,
                 compute_grad ? &grad : nullptr);
  return {loss, grad};
}

at::Tensor amid_loss_topk_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                   const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
                                   const std::optional<at::Tensor>& teacher_tail_logmass,
                                   const std::optional<at::Tensor>& row_weight, std::string_view tail, double alpha,
                                   double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                   double ab_beta, double temperature, bool detach_assistant) {
  constexpr const char* op = "amid_loss_topk_bwd";
  const TopkTail tl = parse_tail(op, tail);
  check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tl,
                  temperature);
  check_row_vector(op, "grad_loss", grad_loss, student_logits);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  at::Tensor weight = grad_loss.to(at::kDouble);
  if (row_weight) weight = weight * row_weight->to(at::kDouble);
  weight = weight.contiguous();
  topk_rows_cuda(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, weight, tl, alpha, lam,
                 divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, nullptr, &grad);
  return grad;
}

}  // namespace topk_cuda

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY_IMPL(amid, CUDA, m) {
  m.impl("amid_loss_topk_fwd", &topk_cuda::amid_loss_topk_fwd_cuda);
  m.impl("amid_loss_topk_bwd", &topk_cuda::amid_loss_topk_bwd_cuda);
}

}  // namespace amid
