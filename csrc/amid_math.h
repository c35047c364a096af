// amid_math.h -- the per-element and per-row math of the AMiD loss, shared by the CPU and CUDA
// kernels so that both backends compute exactly the same formulas (one place for the math).
//
// Notation (see ../shared/docs/amid-math.md, the spec): for one row with temperature-scaled logits
// t (teacher) and s (student), A = LSE(t), B = LSE(s), lp = t - A, lq = s - B, p = e^lp, q = e^lq.
// The assistant is the alpha-mixture  r~ = (lam p^k + (1-lam) q^k)^(1/k),  k = (1-alpha)/2
// (geometric p^lam q^(1-lam) at alpha = 1), lt = log r~, Z = LSE(lt), lr = lt - Z, r = e^lr, and
// w = d lt / d lq. A loss F(lr, lq) has, with G = dF/dlr and H = dF/dlq (explicit part),
//
//     dF/ds_j = w_j (G_j - r_j S_G) + H_j - q_j K,      K = S_Gw - Wbar S_G + S_H,
//     S_G = sum G,  S_Gw = sum G w,  S_H = sum H,  Wbar = sum r w                    (spec §4.1)
//
// and with the assistant detached (TAID) only the explicit part remains: H_j - q_j S_H.
//
// The element functions are templates on
//   * a math policy `M` providing exp / log1p / expm1 (LibMath below: the C/CUDA math library; the
//     CPU kernel passes a vectorisable polynomial policy for float, see cpu/vec_math.h), and
//   * the divergence and order as compile-time constants, so a kernel's inner loop has no switch.
// Everything is branch-free (selects), so CPU loops vectorise and GPU warps do not diverge. No
// fast-math: the loss is user-visible.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AMID_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined: the CPU kernel's loops vectorise only if no call is left in them, and GCC's
// inlining budget otherwise depends on unrelated code (e.g. -DNDEBUG kept VecMath::exp a call).
#define AMID_HD inline __attribute__((always_inline))
#else
#define AMID_HD inline
#endif



namespace amid {

// Divergence and order codes, parsed once on the host from the schema's strings. kJSD ("jsd") is
// the combined order lam D(p||r) + (1 - lam) D(q||r): both orders against the one assistant r,
// weighted by the mixture's own weights (at alpha = -1 with kl, GKD's generalized JSD(beta = lam)),
// computed in one set of passes (jsd_terms below).
enum class Divergence : int { kKL = 0, kAB = 1 };
enum class Order : int { kPR = 0, kQR = 1, kRP = 2, kRQ = 3, kJSD = 4 };

// How lt = log r~ is formed; chosen on the host from (alpha, lam) so the kernels never branch on
// floating-point parameter values per element.
enum class MixMode : int {
  kStudent = 0,    // lam == 0: r~ = q for every alpha
  kTeacher = 1,    // lam == 1: r~ = p for every alpha
  kGeometric = 2,  // alpha == 1: lt = lam lp + (1-lam) lq, w = 1-lam
  kPower = 3,      // alpha != 1, 0 < lam < 1: the power mean, stable expm1/log1p form
};

// Number of per-row statistics the forward op returns and the backward op consumes:
// [A_max, B_max, Z, S_G, K, A_log, B_log, Z2]: the log-sum-exps of the scaled teacher / student logits in
// two parts (A = A_max + A_log, see RowLse), the LSE of lt, the two row scalars of the gradient (for kl
// the shifted S_G', K' of element_terms), and Z2: for the combined order (kJSD) the LSE of lt as its
// second term (qr) computes it (relative to q; Z is the first term's, relative to p), else Z. The two
// agree up to rounding, but each term's small-divergence form needs its own (see jsd_terms). Keep in
// sync with amid/ops.py (NUM_STATS).
constexpr int kNumStats = 8;
enum StatIndex : int {
  kStatAMax = 0, kStatBMax = 1, kStatZ = 2, kStatSG = 3, kStatK = 4, kStatALog = 5, kStatBLog = 6, kStatZ2 = 7
};

// Coefficients kept for the series of the alpha-beta element function phi / (c dd) (see ab_terms_pow).
constexpr int kAbPhiTerms = 18;
// ... of which float math evaluates the first 7: make_params economizes the series to them (float only).
constexpr int kAbPhiTermsFloat = 7;
// Coefficients of the power mean's series for |x| < 1/2 in float (power_log; make_params economizes its first
// kMixTaylor Taylor terms to kMixTerms).
constexpr int kMixTerms = 6;
constexpr int kMixTaylor = 18;
// log2(e): one place for the host's row constants (make_params) and the kernels' base-2 exponentials.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
struct LossParams {
  MixMode mode;
  Divergence divergence;
  Order order;
  bool detach;      // gradient does not flow through the student inside r (qr / rq only)
  T lam, one_minus_lam;
  // log(lam), log(1 - lam) and log((1 - lam) / lam), computed in double on the host (exact even where
  // 1 - lam rounds to 1 in T, or lam underflows in T); lam_ratio = lam / (1 - lam). kPower only.
  T log_lam, log_1m_lam, log_odds, lam_ratio;
  // lam or 1 - lam below 16 x the smallest normal number of T, or lam < 2^-60 (kPower only): the cases
  // where the mixture needs its log-sum-exp form or its scaled weight (power_log, power_finish). A
  // parameter, so the kernels' branches on it are uniform and never taken for ordinary lam.
  bool lam_tiny;
  T k, inv_k;       // k = (1 - alpha) / 2, used by kPower only
  // 1 / k where it is 1, 2, 4 or 8 (alpha = -1, 0, 1/2, 3/4; k then a power of two), else 0: the GPU's streaming
  // kl/pr, kl/qr W with p, q, r from one exponential (grad_from_logits_pow2; compiled for kPow2N and kPow2NArith). kPower only.
  // Here, not in lam_tiny's padding: the 4 bytes it shifts the fields below by changed ptxas's register allocation of
  // the alpha-beta kernels (bf16 sm_90a spill instructions per row: ab/rq streaming 32 -> 0, resident 83 -> 61; in
  // the padding, as before; before ab_a 14 and 83, before mix_h 4 and 61). Measured with the gauge, not designed.
  int pow_n;
  // k log2(e), log2(lam) and log2(1 - lam) (computed in double on the host): W's weight w from the kept d as one
  // base-2 exponential of an FMA; c_non: log(1 - lam) / k (index 0: pr / rp) and log(lam) / k (1: qr / rq), lt - l_non
  // where the non-reference side dominates (power_mixture_from_d). kPower only.
  T k_log2e, log2_lam, log2_1m_lam, c_non[2];
  // The float power mean's series for |x| < 1/2 (power_log): with lam' the weight of the side that is not
  // the loss's reference (1 - lam for pr / rp, index 0; lam for qr / rq, index 1),
  //   log1p(lam' expm1(y)) / k = y sum_n mix_h[i][n] y^n,
  // the cumulant generating function of a Bernoulli(lam') over k (computed in double on the host). kPower only.
  T mix_h[2][kMixTerms];
  T ab_a, ab_b;     // alpha-beta divergence exponents (a on the first argument)
  T ab_g, ab_a_over_g, ab_b_over_g, inv_ab, inv_a, inv_b;  // a+b, a/(a+b), b/(a+b), 1/(ab), 1/a, 1/b
  T ab_c;  // c: the exponent of the assistant in x^a y^b (b in pr / qr, a in rp / rq)
  // The other exponent d = g - c (exact: a in pr / qr, b in rp / rq; c d = a b) and the inverses the
  // element terms use, so that nothing divides a difference of nearly equal powers by a tiny a or b:
  // phi(v) / (c d) = -sum_{n>=2} ab_phi_cd[n-2] v^n with ab_phi_cd[n-2] = sum_{j<n-1} c^j g^(n-2-j) / n!
  // (float: economized to kAbPhiTermsFloat terms on |g v| <= 1/2).
  T ab_d, inv_c, inv_d, inv_g;
  // R2's element terms (ab_terms_one_series) form one of Hc, Gd by its series: the one whose exponent is the smaller,
  // ab_e_s = min(c, d) (Hc where c <= d, else Gd), with inv_e_s = 1 / ab_e_s; Pcd from it divided by the larger
  // exponent, signed: ab_pcd_k = 1 / d where c <= d, else -1 / c; and the other term from Gd = Hc - g Pcd:
  // ab_other_g = -g where c <= d (Gd), else g (Hc).
  T ab_e_s, inv_e_s, ab_pcd_k, ab_other_g;
  // g, c, dd times log2(e) (in double on the host): the element terms' powers as one MUFU.EX2 of one product or FMA
  // (exp2_approx), not exp_approx's second product with log2(e)
  T ab_g_log2e, ab_c_log2e, ab_d_log2e;
  // Where the assistant's mass is mostly missing (Z < -1.4), the online row sums (amid_online.h: finalize)
  // still shift their element terms by Z while g |Z| < ab_shift_limit = min(60, log(1 / (a b))): there the
  // shift's terms (~e^(g |Z|)) lose fewer digits than the power sums' difference divided by a b.
  T ab_shift_limit;
  T ab_phi_cd[kAbPhiTerms];
  T inv_temperature;
  // The float mixture under WideWeights (kSplitLog) in base 2: power_pre's exponent x2 = k log2(e) (lp - lq), so that
  // E = e^-|x| is one MUFU.EX2 of -|x2| without a product by log2(e); mix_h2 is mix_h for an argument in base 2
  // (mix_h[i][n] ln(2)^(n+1)), and ln2_inv_k = ln(2) / k takes power_log's base-2 logarithm to c. kPower only.
  // (Last: a field inserted earlier shifts the others, and ptxas's register allocation with them.)
  T mix_h2[2][kMixTerms];
  T ln2_inv_k;
};

template <typename T>
AMID_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ------------------------------------------------------------------------------------------------
// The bits of a value as another type of the same size (host and device; the CPU math uses it too).
template <typename To, typename From>
AMID_HD To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: expected types of the same size");
  return __builtin_bit_cast(To, x);
}

// a b + c with one rounding, float and double, host and device (one FFMA / DFMA on the GPU).
AMID_HD float fma_t(float a, float b, float c) { return fmaf(a, b, c); }
AMID_HD double fma_t(double a, double b, double c) { return fma(a, b, c); }

// ------------------------------------------------------------------------------------------------
// Math policy: the C / CUDA math library (accurate to ~1 ulp), plus the reciprocal and the
// logarithms the power mean uses (rcp, log_mix, log_sel).

struct LibMath {
  // Whether every logit of the row is finite with |logit / T| < 2^100 (BoundedRow): no -inf masks and
  // no overflow in x - max, (t - s) - (A - B), so their guards compile out. The general policy: false.
  static constexpr bool kBounded = false;
  // Whether the row's mixture weights are wide (WideWeights): the float power_log then needs no log1p series.
  static constexpr bool kWideWeights = false;
  // Whether R2 takes kl's Z-dependent sums relative to lt = 0 instead of the running maximum (FixedShift).
  static constexpr bool kFixedShift = false;
  // Whether no element of the row has |k (lp - lq)| > 80, the power mean's far-gap form (NearGaps).
  static constexpr bool kNearGaps = false;
  static AMID_HD float exp(float x) { return ::expf(x); }
  static AMID_HD double exp(double x) { return ::exp(x); }
  static AMID_HD float exp2(float y) { return ::exp2f(y); }
  static AMID_HD double exp2(double y) { return ::exp2(y); }
  static AMID_HD float log(float x) { return ::logf(x); }
  static AMID_HD double log(double x) { return ::log(x); }
  static AMID_HD float log1p(float x) { return ::log1pf(x); }
  static AMID_HD double log1p(double x) { return ::log1p(x); }
  // expm1(x) for |x| < 1/2 as x expm1_div(x) (5.0 ulp on the host; no special function; tests/cpp: test_float_series).
  static AMID_HD float expm1_small(float x) { return x * expm1_div(x); }
  static AMID_HD double expm1_small(double x) { return ::expm1(x); }
  // expm1(x) / x for |x| < 1/2 (1 at x = 0; stays accurate for subnormal x): a degree-5 polynomial fitted for
  // relative error on [-1/2, 1/2] (a discrete minimax with the constant fixed at 1; its float coefficients, evaluated
  // exactly, are within 1.8e-7 of expm1(x) / x), three FMAs fewer than the degree-8 Taylor form: 4.0 ulp evaluated
  // with FMA (the GPU). Its users need far less: r - ref and the alpha-beta terms to ~1e-6 relative (tests/cpp:
  // test_float_series).
  static AMID_HD float expm1_div(float x) {
    return 1.0f + x * (0.4999995231628418f + x * (0.1666606217622757f + x * (0.04167160764336586f +
           x * (0.00840570405125618f + x * 0.0013822148321196437f))));
  }
  static AMID_HD double expm1_div(double x) { return x == 0.0 ? 1.0 : ::expm1(x) / x; }
  // expm1(x) given e = exp(x) (so no second special-function call in float): e - 1 is exact enough
  // once |x| >= 1/2 (|e - 1| >= 0.39: < 2 ulp relative); below, the polynomial. This matters as
  // alpha -> 1, where lt - lq = log1p(lam expm1(k d)) / k amplifies the absolute error of expm1 by
  // 1/k (spec §5.3), and in the small-divergence regime (spec §5.6).
  static AMID_HD float expm1_from_exp(float x, float e) {
    return std::fabs(x) < 0.5f ? expm1_small(x) : e - 1.0f;
  }
  static AMID_HD double expm1_from_exp(double x, double /*e*/) { return ::expm1(x); }
  // The same given nax = -|x| too (the mixture has it): one comparison.
  static AMID_HD float expm1_from_exp_abs(float x, float nax, float e) {
    return nax > -0.5f ? expm1_small(x) : e - 1.0f;
  }
  static AMID_HD double expm1_from_exp_abs(double x, double /*nax*/, double /*e*/) { return ::expm1(x); }
  // e^x for x <= 0 (or -inf) where a relative error of ~2^-22 + |x| 2^-24 is harmless: terms of a
  // log-sum-exp and probabilities that only scale other terms (never the difference of two nearly
  // equal ones). On the GPU one MUFU.EX2 of x log2(e) (ex2.approx: ~2^-22 relative, plus the rounding
  // of the product, |x| 2^-24; results below 2^-126 flush to 0) instead of expf's ~9 instructions.
  // The host uses expf (the C++ tests emulate the GPU's error: GpuEmuMath).
  static AMID_HD float exp_approx(float x) {
#if defined(__CUDA_ARCH__)
    return exp2_approx(x * float(kLog2e));
#else
    return ::expf(x);
#endif
  }
  static AMID_HD double exp_approx(double x) { return ::exp(x); }
  // e^x to ~2^-22 relative at any x (no |x| 2^-24 term), for terms whose error must not grow with |x| (the alpha-beta
  // R2's x^a rho^b and o, whose arguments reach tens): y = x log2(e) rounded, and its rounding's share of the result,
  // c = x - y ln 2 (two FMAs with ln 2 in two parts; |c| <~ |x| 2^-24), as the factor 1 + c (2^-23 beyond ex2.approx's
  // 2^-22 in all, measured over x in [-100, 20] with the factor rounded before the product; now one FMA, e + e c). On the
  // GPU one MUFU.EX2 and four FMA-pipe instructions where expf took ~8.6 in the gauge. Results below 2^-126 flush to 0;
  // x = -inf gives NaN (callers: exp_corrected, which guards it outside bounded rows), and so may an overflow (x > 88.7:
  // inf + inf c with c < 0), which no caller passes (logs of probabilities times positive exponents: x <= 0). The host
  // uses expf (the C++ tests emulate the GPU's error).
  static AMID_HD float exp_corr(float x) {
#if defined(__CUDA_ARCH__)
    const float y = x * float(kLog2e);
    constexpr float kLn2Hi = 0.693147180559945309f;
    constexpr float kLn2Lo = float(0.693147180559945309 - double(kLn2Hi));
    const float c = fmaf(y, -kLn2Lo, fmaf(y, -kLn2Hi, x));  // (y times -ln 2: with -y, nvcc formed x (-log2 e) apart)
    const float e = exp2_approx(y);
    return fmaf(e, c, e);  // e (1 + c) in one FMA (one rounding fewer than the sum and the product)
#else
    return ::expf(x);
#endif
  }
  static AMID_HD double exp_corr(double x) { return ::exp(x); }
  // 2^y, as exp_approx but for an argument already in the base-2 domain (no product with log2(e) to round): on the
  // GPU one MUFU.EX2 (~2^-22 relative; flushes below 2^-126). The host uses exp2f.
  static AMID_HD float exp2_approx(float y) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
    return r;
#else
    return ::exp2f(y);
#endif
  }
  static AMID_HD double exp2_approx(double y) { return ::exp2(y); }
  // 1 / x. On the GPU the approximate reciprocal (one MUFU.RCP, flushes subnormals) refined by one
  // Newton step (< 1 ulp for normal x): an IEEE division is ~10 instructions plus a slow-path check.
  // Callers guard x = 0 and x = inf with selects (the step gives NaN there). The host (and the C++ tests'
  // emulation of the GPU math) divides.
  static AMID_HD float rcp(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return fmaf(r, fmaf(-x, r, 1.0f), r);
#else
    return 1.0f / x;
#endif
  }
  static AMID_HD double rcp(double x) { return 1.0 / x; }
  // 1 / x to 1 ulp (GPU: one MUFU.RCP, flushes subnormals; no Newton step), where an ulp more does not
  // matter: the mixture's weight w and expm1(|x|). The host divides (the C++ tests emulate the error).
  static AMID_HD float rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return 1.0f / x;
#endif
  }
  static AMID_HD double rcp_approx(double x) { return 1.0 / x; }
  // log(s) for the float power mean's sum s = lam_o + lam' e^+-|x| of two non-negative terms (a normal
  // number; power_log), where an absolute error of ~2^-22 is acceptable (|x| >= 1/2 there: the element's
  // assistant is not close to its reference). On the GPU one MUFU.LG2 (lg2.approx.ftz; CUDA's __log2f:
  // absolute error 2^-22 for s in [1/2, 2], else 2 ulp, i.e. up to 2^-22 |log2 s|) of the mantissa
  // m = s 2^-e in [1/sqrt 2, sqrt 2), plus e ln 2 by one FMA: 2^-22 ln 2 absolute and one rounding at any
  // s, where a logarithm kept to the last bit took ~22 instructions. The host uses logf (the C++ tests
  // emulate the GPU's error). Float only: double's power_log keeps log_sel.
  static AMID_HD float log_mix(float s) {
#if defined(__CUDA_ARCH__)
    const int32_t eb = (bit_cast<int32_t>(s) - 0x3f3504f3) & int32_t(0xff800000);  // e << 23
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(bit_cast<float>(bit_cast<int32_t>(s) - eb)));
    return fmaf(float(eb >> 23), 0.693147180559945309f, r * 0.693147180559945309f);
#else
    return ::logf(s);
#endif
  }
  // log2(s) + a for s in (0, 1], a normal number: the sums of power_log under WideWeights, >= min(lam, 1 - lam) (there
  // without log_mix's mantissa split, 6 instructions, which sums of any magnitude need). One MUFU.LG2 (lg2.approx.ftz,
  // CUDA's __log2f: absolute error 2^-22 on [1/2, 2], else 2 ulp of its result, so still 2^-22 absolute down to
  // s = 1/4, 2^-22 |log2 s| below) and one add. The host uses log2f (the C++ tests emulate the GPU's error).
  static AMID_HD float log2_add(float s, float a) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    return r + a;
#else
    return ::log2f(s) + a;
#endif
  }
  // log2(s) c + a for a positive normal s (the streaming kl W's scaled sums at k = 1 / N, grad_from_logits_pow2: c =
  // N ln 2 makes it a natural log over k): one MUFU.LG2 (the error of log2_add's) and one FMA. The host uses log2f (the
  // C++ tests emulate the GPU's error).
  static AMID_HD float log2_fma(float s, float c, float a) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    return fmaf(r, c, a);
#else
    return fmaf(::log2f(s), c, a);
#endif
  }
  // use_log1p ? log1p(y) : log(s): the double power mean's logarithm (power_log).
  static AMID_HD double log_sel(bool use_log1p, double y, double s) { return use_log1p ? ::log1p(y) : ::log(s); }
};

// A math policy for rows whose logits are all finite with |logit / T| < 2^100 (the GPU forward kernel
// checks this per row after R1: LseAcc::bounded), under an ordinary lam (!LossParams::lam_tiny: the
// launcher's choice): the same results as Base there, bit for bit, without the guards for -inf masks and
// overflow (log_prob, logit_gap, select_both_masked, the kl keep masks) and without the tiny-lam forms
// (power_log, power_finish), whose code ptxas otherwise merges into the hot loop (~7.7 instructions per element).
template <class Base>
struct BoundedRow : Base {
  static constexpr bool kBounded = true;
};

// The library math in place of every approximate instruction (exp_approx, rcp_approx, log_mix): for a kernel
// whose rows are short, where the approximate exponential's ~2^-22 relative error is not averaged out over
// many elements, and whose instruction count does not matter: the top-k kernel (amid_topk_cuda.cu), whose
// bucket rows are k + 1 bins. On the host this is LibMath's math exactly.
struct PreciseMath : LibMath {
  using LibMath::exp_approx;  // (the double overloads are the library's already)
  using LibMath::rcp_approx;
  using LibMath::exp2_approx;
  using LibMath::exp_corr;
  static AMID_HD float exp_approx(float x) { return ::expf(x); }
  static AMID_HD float exp2_approx(float y) { return ::exp2f(y); }
  static AMID_HD float rcp_approx(float x) { return 1.0f / x; }
  static AMID_HD float log_mix(float s) { return ::logf(s); }
  static AMID_HD float log2_add(float s, float a) { return ::log2f(s) + a; }
  static AMID_HD float log2_fma(float s, float c, float a) { return fmaf(::log2f(s), c, a); }
  static AMID_HD float exp_corr(float x) { return ::expf(x); }
};

// ------------------------------------------------------------------------------------------------
// The reference side of a loss: the distribution the assistant is compared with (p for pr / rp,
// q for qr / rq). Small losses are the regime where r ~ that side (spec §5.6), so the kernels carry
// d = lt - l_ref, computed without cancellation, next to lt.
template <Order O>
constexpr bool ref_is_p() {
  return O == Order::kPR || O == Order::kRP;
}

// A math policy for rows of a power mean whose weight on the side that is not the loss's reference is at least
// kWideWeight (both weights for the combined order kJSD; wide_weights): there the float power_log's log1p series
// is never selected (its argument a = lam_nonref (e^-+|x| - 1) has |a| >= 0.32 (1 - e^-1/2) = 0.126 > 1/8 where
// |x| >= 1/2), so it compiles out (~16 instructions per element fewer in the GPU's R2), and the float mixture takes
// the logarithm of a sum <= 1 in every form (kSplitLog; power_log: one MUFU.LG2 without the mantissa split, 6 fewer):
// Base's values to the approximate logarithm's error (tests/cpp: test_bounded_rows measures them; in double the
// same values bit for bit). lam = 0.5 takes it in every order, lam = 0.1 in pr and rp. A uniform choice per launch
// (amid_loss_kernels.cuh), over BoundedRow.
template <class Base>
struct WideWeights : Base {
  static constexpr bool kWideWeights = true;
};
constexpr double kWideWeight = 0.32;
// Whether power_pre takes E = e^-|x| in every form (float under WideWeights: power_log's split logarithm); else E is
// e^-|x| in the base form and e^|x| in the non-own one.
template <class M, typename T>
constexpr bool kSplitLog = M::kWideWeights && std::is_same<T, float>::value;

// A math policy for R2 over a bounded row: the Z-dependent sums (S = sum rho, Wb = sum rho w, kl rp / rq's
// rho-weighted fields, alpha-beta's rho^c sums) relative to lt = 0 instead of the running maximum m, so that an
// element needs neither the test of lt against m (with its rarely taken rescaling block) nor lt - m: rho = e^lt, and
// alpha-beta's powers need no factor e^(c m) (kl/pr's R2: 90 -> 84 instructions per element on sm_90a; ab/rq's 125.4 ->
// 115.8). lt <= 0 up to rounding (a power mean lies between its arguments, two log-probabilities), so no term
// overflows. (alpha-beta's rho^c, c < 1, flush later than rho: e^(c lt) with c lt >= -87 for the row's largest terms
// once S >= kFixedShiftMinS below, lt >= log(2^-20 / V).)
// The price is accuracy where S is small. Under the running maximum the largest term is e^0 = 1 exactly and the
// others' arguments lt - m are small near it; here every term has ex2.approx's error, 2^-22, and its argument's
// rounding, |lt| 2^-25, which lt's own error does not share: Z's error grows by about that of the terms that make
// up S, whose |lt| is about -log S. So a row keeps these sums only while S >= kFixedShiftMinS = 2^-20 (RowAcc::
// shift_ok: arguments down to ~ -14, where the rounding is ~2^-21, MUFU's size); a row with a smaller S (alpha >=
// ~0.9 with p and q far apart; at alpha < 1 S >= max(lam, 1 - lam)^(1/k)) runs R2 again under the running maximum
// (amid_loss_kernels.cuh). Measured in the C++ tests' emulation (test_fixed_shift_rows, test_online_float): the loss
// of ordinary inputs 1.3e-6 -> 2.1e-6 relative at worst; in rows built to be far apart, gradients up to ~5x the
// running maximum's error (8.5e-6 of the largest element at worst), all within issue 9's float budgets.
template <class Base>
struct FixedShift : Base {
  static constexpr bool kFixedShift = true;
};
constexpr double kFixedShiftMinS = 0x1p-20;

// A math policy for a bounded row in which no element's power-mean exponent x = k (lp - lq) exceeds 80 in magnitude
// (near_gaps, from R1's extremes): there power_pre's far-gap form (big: the other side as the base, lt = l_non + c,
// d = c - (l_non - l_ref); power_lt_d) is never selected, so it compiles out with its selects and, in the orders whose
// loss does not read the other side's log-probability (rq, qr for alpha-beta; every order's R2 for kl), that
// log-probability too: the same values bit for bit (tests/cpp: test_near_gaps). The fast path of every row whose
// logit gaps stay within 80 / |k| nats (every row of an ordinary distillation at |k| <= 1, alpha in [-1, 3]);
// other rows run Base (amid_loss_kernels.cuh: a uniform branch per row).
template <class Base>
struct NearGaps : Base {
  static constexpr bool kNearGaps = true;
};
// Whether every element of a row has |k (lp - lq)| <= kNearGap < 80 (power_pre's far-gap threshold; the margin covers
// the rounding of lp - lq), from each side's largest and smallest scaled logits and A - B (dAB): lp - lq =
// (t - s) - (A - B) lies in [t_min - s_max - dAB, t_max - s_min - dAB] (so a teacher offset from its student moves
// nothing). NaN or inf: false.
constexpr double kNearGap = 79;
template <typename T>
AMID_HD bool near_gaps(const LossParams<T>& P, T t_max, T s_max, T t_min, T s_min, T dAB) {
  const T up = (t_max - s_min) - dAB, down = (s_max - t_min) + dAB;  // bounds of lp - lq and of lq - lp
  return std::fabs(P.k) * (up > down ? up : down) <= T(kNearGap);
}
template <Order O, typename T>
AMID_HD bool wide_weights(const LossParams<T>& P) {
  const bool p_side = double(P.one_minus_lam) >= kWideWeight, q_side = double(P.lam) >= kWideWeight;
  return O == Order::kJSD ? p_side & q_side : (ref_is_p<O>() ? p_side : q_side);
}

// e^x by M::exp_corr (2^-22 relative at any x), with -inf giving 0 outside bounded rows (whose arguments are finite).
template <class M, typename T>
AMID_HD T exp_corrected(T x) {
  if constexpr (M::kBounded) {
    return M::exp_corr(x);
  } else {
    return x == neg_inf<T>() ? T(0) : M::exp_corr(x);
  }
}

// c[I] + v (c[I+1] + v (... c[N-1])), expanded at compile time: a loop left inside an element
// function would stop the CPU kernel's loops from vectorising (GCC does not unroll it first).
template <int I, int N, typename T>
AMID_HD T horner(const T* c, T v) {
  if constexpr (I == N - 1) {
    return c[I];
  } else {
    return c[I] + v * horner<I + 1, N>(c, v);
  }
}

// log1p(a) for |a| < 1/8 by its Taylor series (truncation (1/8)^8 / 9 < 1e-8 relative; no special function).
template <typename T>
AMID_HD T log1p_series(T a) {
  return a * (T(1) + a * (T(-1.0 / 2) + a * (T(1.0 / 3) + a * (T(-1.0 / 4) + a * (T(1.0 / 5) + a * (T(-1.0 / 6) +
         a * (T(1.0 / 7) + a * T(-1.0 / 8))))))));
}

// log(e^a + e^b) by the larger one plus log1p of the other's ratio (no overflow, no cancellation): the power
// mean's logarithm where a weight is below the normal range of T (the tiny-lam forms of power_log and
// power_mixture_from_d).
template <class M, typename T>
AMID_HD T log_add_exp(T a, T b) {
  const T u = a - b;
  return (u > T(0) ? a : b) + M::log1p(M::exp(u > T(0) ? -u : u));
}

// The power mean (kPower) in three steps, so that no logarithm is needed after R2: the GPU's R2 stores d
// (power_kept: c where a side is masked) per element in shared memory beside the row slice and W rebuilds lt
// and w from it (power_mixture_from_kept), the same values as W recomputing the mixture, without the log.
//
// Reference the larger of p^k, q^k (the branch's "base" B; N the other side) so that, with
// x = k dpq and e = exp(-|x|) <= 1 (spec §3.2),
//   lt = l_B + L / k,   L = log(lam_B + lam_N e)  (<= 0),
// and w = sigmoid(log((1-lam)/lam) - x) shares e. L is log1p(lam_N expm1(-|x|)) while that
// argument is >= -1/2: accurate to the last bit near L = 0 (the small-divergence regime, spec
// §5.6). Below, 1 + lam_N expm1(.) would stand for lam_B + lam_N e with lam_B = 1 - lam_N
// implied, which is lost once lam_B < eps (1 - lam rounds to 1): the error grows like eps / lam_B
// and becomes log1p(-1) = -inf. There L is the log of lam_B + lam_N e itself (a sum of two
// non-negative terms, |L| >= log 2: relative accuracy ~eps), or, where lam_B is not a normal
// number of T, the log-sum-exp of log(lam_B) and log(lam_N) - |x| (logs computed in double on the
// host): no cancellation, any lam in (0, 1).
// d = lt - l_ref: when B is the loss's reference side ("own" branch) d = L / k; otherwise
// d = l_N - l_ref + L / k, which cancels as r -> ref, so it is taken as
// log1p(lam_N' expm1(|x|)) / k (lam_N' the weight of the non-reference side; the argument is
// >= 0, so no cancellation), unless |x| > 80 where e^|x| nears float's range (and d is large).
// Each element needs one of the two forms, so one exponential serves it: E = e^-|x| in the base
// form, e^|x| in the non-own one, and w by one reciprocal of whichever of its two forms has E.
// In float, c itself comes from series and MUFU work instead of expm1 and log1p (power_log): for
// |x| < 1/2 both forms are log1p(lam_N' expm1(-+|x|)) / k, one series in the signed exponent.
template <typename T>
struct PowerPre {
  // (kSplitLog: ax and sx in base 2, x log2(e): power_pre)
  T ax;   // -|x|
  T sx;   // E's exponent: -|x| in the base form, |x| in the non-own form
  T E;    // e^-|x| in the base form (own or big: base), e^|x| in the non-own form (<= e^80: finite)
  T em1;  // expm1 of the same argument (double only: float's power_log does not use it)
  T w;    // R2's weight (power_finish; W forms its own from d, power_mixture_from_d, and drops this one)
  bool q_base, own, big, base;
};

template <bool REF_P, class M, typename T>
AMID_HD PowerPre<T> power_pre(const LossParams<T>& P, T dpq) {
  PowerPre<T> m;
  // NaN when both are -inf (handled by the caller's last select). Under kSplitLog in base 2 (x log2(e): ax, sx and the
  // thresholds on them too; LossParams::mix_h2), so that E takes no product by log2(e).
  const T x = (kSplitLog<M, T> ? P.k_log2e : P.k) * dpq;
  m.q_base = x <= T(0);
  // -|x| by fabs, not as a select on q_base: from that select and sx's, GCC derived masks it could not
  // vectorise, and the CPU kernel's mixture loop went scalar (9x slower)
  m.ax = -std::fabs(x);
  m.own = REF_P ? !m.q_base : m.q_base;
  m.big = M::kNearGaps ? false : m.ax < (kSplitLog<M, T> ? T(-80 * kLog2e) : T(-80));
  m.base = m.own | m.big;
  if constexpr (kSplitLog<M, T>) {
    // sx only for power_log's series (|x| < 1/2, never big): there base = own, so sx = -|x| where p's side is the own
    // one (x > 0 with REF_P, x <= 0 without) and |x| elsewhere: -x with p as the reference, x with q. No select.
    m.sx = REF_P ? -x : x;
    // E = e^-|x| in every form (power_log takes the non-own form's log as |x| + the log of a sum <= 1)
    m.E = M::exp2_approx(m.ax);  // the element's one exponential (one MUFU.EX2 on the GPU; ax in base 2)
    m.em1 = T(0);  // (unused in float)
    // w = 1 / (1 + lam / (1-lam) e^x): E = e^x where x <= 0 (q_base), else e^x = 1 / E and w = E / (E + lam / (1-lam))
    m.w = (m.q_base ? T(1) : m.E) * M::rcp_approx(m.q_base ? T(1) + P.lam_ratio * m.E : m.E + P.lam_ratio);
  } else {
    const T sx = m.base ? m.ax : -m.ax;
    m.sx = sx;
    m.E = M::exp_approx(sx);  // the element's one exponential (one MUFU.EX2 on the GPU)
    m.em1 = M::expm1_from_exp_abs(sx, m.ax, m.E);
    // w = 1 / (1 + lam / (1-lam) e^(q_base ? -|x| : |x|)): E has that sign where base == q_base; else
    // e^(...) = 1 / E and w = E / (E + lam / (1-lam)). One reciprocal (to 1 ulp: w only weights R2's
    // sums); w = 0 where E = 0 in the second form (e^|x| infinite), 1 in the first.
    const bool same = sx == x;  // (a float comparison: the CPU loops vectorise it, not bool == bool)
    m.w = (same ? T(1) : m.E) * M::rcp_approx(same ? T(1) + P.lam_ratio * m.E : m.E + P.lam_ratio);
  }
  return m;
}

// Both references' PowerPre from one dpq (the combined order kJSD, which evaluates the mixture relative
// to p and to q): there one side's base form is the other's non-own form, so both e^-|x| and e^|x|
// are needed; the first comes from one exponential, the second from its reciprocal, and (double's
// power_log) both expm1 from one (expm1(|x|) = -expm1(-|x|) e^|x|).
template <class M, typename T>
AMID_HD void power_pre_both(const LossParams<T>& P, T dpq, PowerPre<T>& mp, PowerPre<T>& mq) {
  const T x = (kSplitLog<M, T> ? P.k_log2e : P.k) * dpq;  // (as in power_pre: base 2 under kSplitLog)
  const bool q_base = x <= T(0);
  const T ax = -std::fabs(x);  // (as in power_pre)
  const T e = kSplitLog<M, T> ? M::exp2_approx(ax) : M::exp_approx(ax);
  // (no lambda here: the CPU kernel's loops vectorise only when everything in them is inlined)
  mp.ax = mq.ax = ax;
  mp.q_base = mq.q_base = q_base;
  mp.own = !q_base;
  mq.own = q_base;
  mp.big = mq.big = M::kNearGaps ? false : ax < (kSplitLog<M, T> ? T(-80 * kLog2e) : T(-80));
  mp.base = mp.own | mp.big;
  mq.base = mq.own | mq.big;
  if constexpr (kSplitLog<M, T>) {
    // E = e^-|x| on both sides (power_pre: kSplitLog), so no 1 / e; w as power_pre's
    mp.sx = -x, mq.sx = x;  // (the series' exponent only: as power_pre's)
    mp.E = mq.E = e;
    mp.em1 = mq.em1 = T(0);
    mp.w = mq.w = (q_base ? T(1) : e) * M::rcp_approx(q_base ? T(1) + P.lam_ratio * e : e + P.lam_ratio);
    return;
  }
  const T inv_e = M::rcp_approx(e);  // +inf where e = 0 (|x| > 80: there both sides take the base form)
  const T em1 = M::expm1_from_exp_abs(ax, ax, e);
  const T ep1 = -em1 * inv_e;
  const T w = M::rcp_approx(T(1) + P.lam_ratio * (q_base ? e : inv_e));
  // Each side's exponent as a float select (sx = -|x| in its base form, |x| in its non-own one; the two
  // agree at x = 0): on the masks above GCC's CPU loops went scalar.
  const T sx_p = x < T(-80) ? x : -x, sx_q = x > T(80) ? -x : x;
  mp.sx = sx_p;
  mq.sx = sx_q;
  mp.E = sx_p <= T(0) ? e : inv_e;
  mq.E = sx_q <= T(0) ? e : inv_e;
  mp.em1 = sx_p <= T(0) ? em1 : ep1;
  mq.em1 = sx_q <= T(0) ? em1 : ep1;
  mp.w = mq.w = w;
}

// c: the element's logarithm term (L / k in the base form, else the non-own form c_up).
template <bool REF_P, class M, bool TINY_LAM, typename T>
AMID_HD T power_log(const LossParams<T>& P, const PowerPre<T>& m) {
  const T lam_nonref = REF_P ? P.one_minus_lam : P.lam;  // weight of the side that is not l_ref
  // One logarithm per element: the base form c_B = L / k where B is the reference side (own) or
  // |x| > 80, else the non-own form c_up.
  const bool base_form = m.base;
  // The sum whose log is k c: s_B = lam_B + lam_N e^-|x| in the base form, and in the non-own form
  // 1 + lam_nonref expm1(|x|) = lam_ref + lam_nonref e^|x| (E = e^|x| <= e^80), the own base form's sum
  // (B = ref there). Both terms >= 0: no cancellation. Only the base form with |x| > 80 and B the
  // non-reference side (from_non) weights E by lam_ref.
  const T lam_ref = REF_P ? P.lam : P.one_minus_lam;
  const bool from_non = !m.own & m.big;
  const T s_B = from_non ? lam_nonref + lam_ref * m.E : lam_ref + lam_nonref * m.E;
  T c;
  if constexpr (std::is_same<T, float>::value) {
    // |x| < 1/2 (own or non-own form, sx = -|x| or |x|): c = log1p(lam_nonref expm1(sx)) / k by the
    // Bernoulli cumulant series in sx with row-constant coefficients (LossParams::mix_h, economized on |sx| <= 1/2:
    // 1.3e-7 relative truncation, 3.9 ulp evaluated), relatively accurate as c -> 0 (the small-divergence regime, spec
    // §5.6), for 6 FMAs where expm1's series and a log1p took ~35 instructions (9 Taylor terms before session 36).
    constexpr int i = REF_P ? 0 : 1;
    const T ser = m.sx * horner<0, kMixTerms>(kSplitLog<M, T> ? P.mix_h2[i] : P.mix_h[i], m.sx);
    // |x| >= 1/2: k c = log1p(a), a = s_B - 1 = lam_nonref (E - 1) (the own and non-own forms; |E - 1| >= 0.39:
    // no cancellation), by its series while |a| < 1/8 (a small weight lam_nonref: the assistant stays near its
    // reference, and c needs its relative accuracy), else the log of the sum, M::log_mix (one MUFU.LG2
    // on the GPU, absolute error ~2^-22: at most ~1.4e-6 of c there). Where a side is masked (x = -+inf)
    // the sum is one weight, whose log is a row constant computed in double: the same error in every
    // masked element would shift the masked mass as a whole. (Not where E only underflows, |x| > 87: a
    // bounded row, which has no masked side, then needs no select and no load of that constant.)
    // (from_non, |x| > 80 with the other side as the base: s_B = lam_nonref + lam_ref e^-|x| is lam_nonref to
    // float precision, and its log by log_mix has the absolute error that every log_mix element has; c is added to
    // l_non - l_ref > 80 / |k| there. So the series is never taken there, and a is formed for the other forms only.)
    // Under the WideWeights policy (lam_nonref >= kWideWeight) |a| >= 0.32 (1 - e^-1/2) > 1/8 in both forms: the
    // series is never taken.
    // Under WideWeights with E = e^-|x| in every form (kSplitLog): the non-own form's sum lam_ref + lam_nonref e^|x| is
    // e^|x| (lam_nonref + lam_ref e^-|x|), the same sum as the from_non base form's, so every element's logarithm is
    // that of a sum in [min(lam_ref, lam_nonref), 1], plus |x| in the non-own form: one MUFU.LG2 and one add
    // (M::log2_add), where the sum's magnitude needed log_mix's mantissa split (6 instructions more). Its error:
    // 2^-22 ln 2 absolute where the sum is >= 1/4 (lam = 0.5: every sum is >= 1/2), at most 2^-22 relative of the log
    // below (lam_ref < 1/4, own form), against log_mix's 2^-22 ln 2 + 2^-24 |log s|; and the non-own form no longer
    // takes e^|x|'s relative error, 2^-22 + |x| 2^-24, into its log as an absolute one.
    // (kSplitLog, whose ax and sx are in base 2: that logarithm in base 2 too, log2(s) + |x| log2(e) by one add, and
    // c = its product by ln 2 / k, where base e took an FMA with ln 2 and the product by 1 / k. The exact form
    // log2(s) ln 2 / k + sign(k) |lp - lq|, one FMA, took one instruction more for the sign of k: a uniform choice.)
    T kc;
    if constexpr (M::kWideWeights) {
      const T s_W = m.own ? lam_ref + lam_nonref * m.E : lam_nonref + lam_ref * m.E;
      kc = M::log2_add(s_W, m.base ? T(0) : -m.ax);
    } else {
      const T a = lam_nonref * (m.E - T(1));
      kc = (std::fabs(a) < T(0.125)) & !from_non ? log1p_series(a) : M::log_mix(s_B);
    }
    if constexpr (!M::kBounded) {
      // the log of s_B's weight without E (kSplitLog: in base 2, as kc; in double on the host). (One select for both
      // policies: written inside each, nvcc made the base-2 pair a constant-bank load per element behind a branch, the
      // backward kernels +3.5 to +7 instructions per element, bf16 sm_90a.)
      const T log_w = M::kWideWeights ? ((from_non == REF_P) ? P.log2_1m_lam : P.log2_lam)
                                      : ((from_non == REF_P) ? P.log_1m_lam : P.log_lam);
      kc = m.ax == neg_inf<T>() ? log_w : kc;
    }
    c = m.ax > (M::kWideWeights ? T(-0.5 * kLog2e) : T(-0.5)) ? ser : kc * (M::kWideWeights ? P.ln2_inv_k : P.inv_k);
  } else {
    // double (the CPU kernel's float64 math), by the library: log1p of a_B = lam_N expm1(-|x|) in
    // [-lam_N, 0] (lam_N the weight of the non-base side), or of y_up = lam_nonref expm1(|x|) >= 0;
    // log(s_B) where a_B < -1/2 (1 + a_B would lose lam_B).
    const T lam_N = m.q_base ? P.lam : P.one_minus_lam;
    const T a = (base_form ? lam_N : lam_nonref) * m.em1;
    c = M::log_sel(base_form ? a >= T(-0.5) : true, a, s_B) * P.inv_k;
  }
  // TINY_LAM = false compiles this out: for callers that have checked !P.lam_tiny (the CPU kernel's
  // vectorised loops, which a conditional block with calls would keep scalar); so does a BoundedRow policy
  // (its launcher has checked).
  if (TINY_LAM && !M::kBounded && P.lam_tiny) {  // a uniform branch that ordinary lam never takes
    // Only where lam_B itself is below the normal range of T (lam or 1 - lam < 2e-37 in float):
    // the log-sum-exp of the logs.
    if (base_form & (s_B < T(16) * std::numeric_limits<T>::min())) {
      const T log_lam_B = m.q_base ? P.log_1m_lam : P.log_lam, log_lam_N = m.q_base ? P.log_lam : P.log_1m_lam;
      c = log_add_exp<M>(log_lam_N + (kSplitLog<M, T> ? m.ax * T(kLn2) : m.ax), log_lam_B) * P.inv_k;
    }
  }
  return c;
}

// lt and d from c (before the both-masked select). Where the other side is the base (|x| > 80) d = (l_non - l_ref) + c
// is large, with l_non - l_ref the logit gap dpq the mixture took (-dpq with p as the reference: one subtraction
// fewer than lq - lp, and the gap's more accurate form).
template <bool REF_P, typename T>
AMID_HD void power_lt_d(const PowerPre<T>& m, T c, T lp, T lq, T dpq, T& lt, T& d) {
  const T l_ref = REF_P ? lp : lq, l_non = REF_P ? lq : lp;
  const bool from_non = !m.own & m.big;  // lt = l_non + c_B: d cancels, taken as a difference (large here)
  d = from_non ? c - (REF_P ? dpq : -dpq) : c;
  lt = from_non ? l_non + c : l_ref + c;
}

// lt, w, d from c (before the both-masked select): R2's form of w, by one reciprocal.
template <bool REF_P, class M, bool TINY_LAM, typename T>
AMID_HD void power_finish(const LossParams<T>& P, const PowerPre<T>& m, T c, T lp, T lq, T dpq, T& lt, T& w,
                          T& d) {
  power_lt_d<REF_P>(m, c, lp, lq, dpq, lt, d);
  // w: (1-lam) / ((1-lam) + lam e) with q as the base, else e / (e + lam / (1-lam)); both terms of
  // each denominator are >= 0. If both vanish in T (lam / (1-lam) and e underflow), w is the
  // sigmoid's saturated value, 1 or 0 by the sign of log((1-lam)/lam) - |x|.
  // w = 1 / (1 + lam / (1-lam) e^(+-|x|)) (1 / e is the mixture's reciprocal, shared with y_up): one more
  // reciprocal of a denominator >= 1, to 1 ulp (w only weights R2's sums); 0 where e = 0 without q as
  // the base (1 + inf). Formed in power_pre (PowerPre::w).
  w = m.w;
  if (TINY_LAM && !M::kBounded && P.lam_tiny) {
    // num / den with the form of the branch (den >= 1 with q as the base). den < 2^-60 (only without q as
    // the base, with lam / (1-lam) and e both tiny): both scaled by 2^100 first, or 1 / den would overflow
    // (num * inf: NaN or inf, e.g. a subnormal lam with a masked student element) where num / den is at
    // most 1; and lam / (1-lam) may be 0 in T here (0 * inf above).
    const T ax = kSplitLog<M, T> ? m.ax * T(kLn2) : m.ax;  // -|x| (base e)
    const T e = M::exp_approx(ax);  // e^-|x| (E is e^|x| in the non-own form)
    const T num = m.q_base ? T(1) : e;
    const T den = m.q_base ? T(1) + P.lam_ratio * e : e + P.lam_ratio;
    const T sc = den < T(8.673617379884035e-19) ? T(1.2676506002282294e30) : T(1);
    w = den > T(0) ? (num * sc) * M::rcp(den * sc) : (P.log_odds + ax > T(0) ? T(1) : T(0));
  }
}

// Where both sides are masked (-inf): lt = -inf, w = d = 0. (No masks in a bounded row: M::kBounded.)
template <class M, typename T>
AMID_HD void select_both_masked(T lp, T lq, T lt_, T w_, T d_, T& lt, T& w, T& d) {
  if constexpr (M::kBounded) {
    lt = lt_, w = w_, d = d_;
    return;
  }
  const bool both_masked = (lp == neg_inf<T>()) & (lq == neg_inf<T>());
  lt = both_masked ? neg_inf<T>() : lt_;
  w = both_masked ? T(0) : w_;
  d = both_masked ? T(0) : d_;
}

// The mixture for one element: lt = log r~, w = d lt / d lq and d = lt - l_ref (l_ref = lp when
// REF_P, else lq), from lp, lq and dpq = lp - lq. The caller forms dpq as (t - s)/T - (A - B),
// not as the difference of lp and lq, so that it keeps its accuracy when p ~ q. lp, lq may be -inf
// (never +inf or NaN: invalid rows are caught before this is called); d is +-inf where one side
// is -inf, and 0 where both are. c: the power mean's logarithm term (power_log; 0 in other modes).
template <MixMode MODE, bool REF_P, class M, bool TINY_LAM = true, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& d, T& c) {
  T lt_, w_, d_;
  c = T(0);
  if constexpr (MODE == MixMode::kStudent) {
    lt_ = lq;
    w_ = T(1);
    d_ = REF_P ? -dpq : T(0);
  } else if constexpr (MODE == MixMode::kTeacher) {
    lt_ = lp;
    w_ = T(0);
    d_ = REF_P ? T(0) : dpq;
  } else if constexpr (MODE == MixMode::kGeometric) {
    // One -inf operand gives -inf (no 0 * inf: lam is in (0, 1) here).
    lt_ = P.lam * lp + P.one_minus_lam * lq;
    w_ = P.one_minus_lam;
    d_ = REF_P ? -P.one_minus_lam * dpq : P.lam * dpq;
  } else {
    const PowerPre<T> m = power_pre<REF_P, M>(P, dpq);
    c = power_log<REF_P, M, TINY_LAM>(P, m);
    power_finish<REF_P, M, TINY_LAM>(P, m, c, lp, lq, dpq, lt_, w_, d_);
  }
  select_both_masked<M>(lp, lq, lt_, w_, d_, lt, w, d);
}

template <MixMode MODE, bool REF_P, class M, bool TINY_LAM = true, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& d) {
  T c;
  mixture<MODE, REF_P, M, TINY_LAM>(P, lp, lq, dpq, lt, w, d, c);
}

// The term R2 keeps per element for W (the resident power-mean kernels of a single order): d = lt - l_ref where
// both sides are finite (every element of a bounded row), else c (power_log). From d, W needs neither the
// mixture's form nor its selects (power_mixture_from_d); a masked side's lt and w take c's forms (d is +-inf
// there).
template <class M, typename T>
AMID_HD T power_kept(T lp, T lq, T c, T d) {
  if constexpr (M::kBounded) {
    return d;
  } else {
    return (lp != neg_inf<T>()) & (lq != neg_inf<T>()) ? d : c;
  }
}

// lt and w from d = lt - l_ref (both sides finite; the W pass: no mixture form, no logarithm, one exponential).
// lt = l_ref + d, except where the non-reference side dominates the mixture (from_non: |x| > 80 on its side, as
// power_lt_d): there d = (l_non - l_ref) + c is large and carries an error of ~eps |d|, which l_ref + d would put
// into lt (tried in R2 too: the CPU op's float loss at logits of scale 1e4 moved by 6e-4, test_huge_logits), so
// lt = l_non + c_non, c_non = log(that side's weight) / k
// (LossParams::c_non: c_B is that constant to float's precision there, lam_N e^-80 below the rounding of the base's
// weight). x is W's own (from lp - lq); where it differs from R2's at |x| = 80 the two forms agree to rounding.
// w = d lt / d lq = (1 - lam) q^k / r~^k, and 1 - w = lam p^k / r~^k:
//   log2 w = log2(1 - lam) - k log2(e) (lt - lq),   log2(1 - w) = log2(lam) - k log2(e) (lt - lp),
// with lt - l_ref = d and lt - l_other = d -+ dpq, each one FMA of row constants (computed in double on the host:
// no overflow at 1 - lam below float's range) and one base-2 exponential. w is formed from the smaller of its two
// sides, so that the exponential is <= 1/2 and its argument's error, ~eps (|k (lt - l_side)| + |log2 weight|),
// scales min(w, 1 - w): taken as (1 - lam) e^(k (lq - lt)) alone, 1 - w was off by ~eps |x| w where w ~ 1 (r ~ q,
// p and q far apart), which cancelled in the gradient's w (G - r S_G) (measured with the GPU math emulated: 1.4e-4
// of a kl/jsd gradient at alpha = -10, 9.6e-5 of a bucket row's at logit scale 12; test_w_from_kept).
// (From c, the logarithm term, W took 10 instructions more per element, kl/pr in bf16: the mixture's forms and their
// selects.)
template <bool REF_P, class M, typename T>
AMID_HD void power_mixture_from_d(const LossParams<T>& P, T lp, T lq, T dpq, T d, T& lt, T& w) {
  const T lt_lq = REF_P ? dpq + d : d;  // lt - lq
  const T lt_lp = REF_P ? d : d - dpq;  // lt - lp
  const T y_w = P.log2_1m_lam - P.k_log2e * lt_lq;  // log2 w
  const bool w_small = y_w < T(-1);
  const T e = M::exp2_approx(w_small ? y_w : P.log2_lam - P.k_log2e * lt_lp);
  w = w_small ? e : T(1) - e;
  const T x = P.k * dpq;
  const bool from_non = !M::kNearGaps && (REF_P ? x < T(-80) : x > T(80));  // (never in a NearGaps row)
  T c_non = P.c_non[REF_P ? 0 : 1];
  if constexpr (!M::kBounded) {
    // Under a tiny lam (a uniform branch; BoundedRow never runs one: the launcher's bounded_ok) the base's weight
    // can be below lam_N e^-|x|: c_B = log(lam_B + lam_N e^-|x|) / k as power_log's log-sum-exp of the logs.
    if (P.lam_tiny) {
      const T log_w_non = REF_P ? P.log_1m_lam : P.log_lam, log_w_ref = REF_P ? P.log_lam : P.log_1m_lam;
      c_non = log_add_exp<M>(log_w_ref - std::fabs(x), log_w_non) * P.inv_k;
    }
  }
  lt = from_non ? (REF_P ? lq : lp) + c_non : (REF_P ? lp : lq) + d;
}

// The mixture from R2's kept term (power_kept): lt, w and d, the same values wherever W takes them (the resident
// kernels' W from shared memory, and every W and exact pass that recomputes the mixture: w_mixture). With one
// side masked the kept term is c and the mixture saturates (spec: -inf logits): for alpha < 1 (k > 0) the
// assistant follows the other side, lt = l_other + log(its weight) / k = l_other + c, and w = 1 where p is masked,
// 0 where q is; for alpha > 1 (k < 0) it is masked too, lt = -inf, and w = 0 where p is masked, 1 where q is
// (w = (1 - lam) q^k / r~^k). d = lt - l_ref: +-inf, or c where the reference side is the one kept (as power_lt_d).
// Both sides masked: lt = -inf, w = d = 0 (select_both_masked).
template <bool REF_P, class M, typename T>
AMID_HD void power_mixture_from_kept(const LossParams<T>& P, T lp, T lq, T dpq, T kept, T& lt, T& w, T& d) {
  T lt_, w_;
  power_mixture_from_d<REF_P, M>(P, lp, lq, dpq, kept, lt_, w_);
  if constexpr (M::kBounded) {
    lt = lt_, w = w_, d = kept;
  } else {
    const bool p_masked = lp == neg_inf<T>(), q_masked = lq == neg_inf<T>();
    const bool ref_masked = REF_P ? p_masked : q_masked, non_masked = REF_P ? q_masked : p_masked;
    const bool k_pos = P.k > T(0);
    const T d_m = ref_masked & k_pos ? std::numeric_limits<T>::infinity() : (non_masked & !k_pos ? neg_inf<T>() : kept);
    const T lt_m = ref_masked & k_pos ? (REF_P ? lq : lp) + kept : (REF_P ? lp : lq) + d_m;
    const T w_m = q_masked == !k_pos ? T(1) : T(0);
    const bool one_masked = p_masked | q_masked;
    select_both_masked<M>(lp, lq, one_masked ? lt_m : lt_, one_masked ? w_m : w_, one_masked ? d_m : kept, lt, w, d);
  }
}

// Runtime-mode form (for code that does not specialise on the mode).
template <bool REF_P, class M, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& d) {
  switch (P.mode) {
    case MixMode::kStudent: mixture<MixMode::kStudent, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    case MixMode::kTeacher: mixture<MixMode::kTeacher, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    case MixMode::kGeometric: mixture<MixMode::kGeometric, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    default: mixture<MixMode::kPower, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
  }
}

// The mixture for the combined order (kJSD): lt and w as above, and d relative to both sides,
// dp = lt - lp and dq = lt - lq, each in the form that keeps its accuracy where r ~ that side (the
// small-divergence regime of that term). Two evaluations of mixture that share their inputs (the power
// mean's exponential, reciprocal and expm1: power_pre_both); lt and w are those of the p-referenced one.
template <MixMode MODE, class M, bool TINY_LAM = true, typename T>
AMID_HD void mixture_both(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& dp, T& dq) {
  T lt2, w2;
  if constexpr (MODE == MixMode::kPower) {
    PowerPre<T> mp, mq;
    power_pre_both<M>(P, dpq, mp, mq);
    T lt_p, w_p, d_p, lt_q, w_q, d_q;
    power_finish<true, M, TINY_LAM>(P, mp, power_log<true, M, TINY_LAM>(P, mp), lp, lq, dpq, lt_p, w_p, d_p);
    power_finish<false, M, TINY_LAM>(P, mq, power_log<false, M, TINY_LAM>(P, mq), lp, lq, dpq, lt_q, w_q, d_q);
    select_both_masked<M>(lp, lq, lt_p, w_p, d_p, lt, w, dp);
    select_both_masked<M>(lp, lq, lt_q, w_q, d_q, lt2, w2, dq);
  } else {
    mixture<MODE, true, M, TINY_LAM>(P, lp, lq, dpq, lt, w, dp);
    mixture<MODE, false, M, TINY_LAM>(P, lp, lq, dpq, lt2, w2, dq);
  }
}

template <class M, typename T>
AMID_HD void mixture_both(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& dp, T& dq) {
  switch (P.mode) {
    case MixMode::kStudent: mixture_both<MixMode::kStudent, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
    case MixMode::kTeacher: mixture_both<MixMode::kTeacher, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
    case MixMode::kGeometric: mixture_both<MixMode::kGeometric, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
    default: mixture_both<MixMode::kPower, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
  }
}

// max(a, b) and |x| where a NaN operand never decides a result (the callers say why): on the GPU
// fmax / fabs, one FMNMX or a free operand modifier; on the host the compare-and-select forms, which
// x86 vectorises as a single max without fmax's NaN fix-up.
template <typename T>
AMID_HD T max_nn(T a, T b) {
#if defined(__CUDA_ARCH__)
  return ::fmax(a, b);
#else
  return a > b ? a : b;
#endif
}
template <typename T>
AMID_HD T abs_nn(T x) {
#if defined(__CUDA_ARCH__)
  return ::fabs(x);
#else
  return x < T(0) ? -x : x;
#endif
}

// A row's log-sum-exp in two parts, LSE = m + l: m the row maximum (exact) and l = log sum e^(x - m)
// in [0, log V]. log p = (x - m) - l keeps its accuracy at any logit scale (x - m is exact near the
// maximum), where x - LSE would carry LSE's rounding, eps |LSE|: 1e-3 at logits of 1e4, everything
// at 1e30. A single LSE is the case l = 0.
template <typename T>
struct RowLse {
  T m, l;
};

// A finite logit never gives log p = -inf (which would read as a masked entry): the difference
// x - max saturates at float's lowest value instead (p = 0 either way), e.g. for logits of opposite
// signs near 3e38.
template <class M, typename T>
AMID_HD T log_prob(T x, RowLse<T> a) {
  const T y = (x - a.m) - a.l;  // never NaN in a valid row (a.m, a.l finite; x finite or -inf)
  if constexpr (M::kBounded) return y;  // |x|, |a.m| < 2^100: finite, and x is never -inf
  // Two plain selects (not a select on the AND of two comparisons: GCC 12 does not vectorise that mask).
  const T yc = max_nn(y, std::numeric_limits<T>::lowest());
  return x == neg_inf<T>() ? x : yc;
}

// A - B of two row log-sum-exps, formed in double (a row constant: the caller computes it once).
template <typename T>
AMID_HD T row_lse_gap(RowLse<T> A, RowLse<T> B) {
  return T((double(A.m) - double(B.m)) + (double(A.l) - double(B.l)));
}

// lp - lq for one element, in whichever of two forms carries the smaller rounding error: (tf - sf) -
// (A - B) (exact when the student is close to its teacher, where lp - lq would carry eps |lp|: the
// small-divergence regime, spec §5.6), or lp - lq (when tf - sf is large or overflows, e.g. logits
// of opposite signs near 3e38). dAB = A - B is a row constant (formed in double by the caller).
template <class M, typename T>
AMID_HD T logit_gap(T tf, T sf, T lp, T lq, T dAB) {
  // Error bounds (up to a factor 2) as maxima, not sums, so that they cannot overflow: an infinite
  // ts or dAB (logits of opposite signs near 3e38) always selects lp - lq, which stays finite.
  // ts is NaN only where both logits are -inf (lp = lq = -inf: the result is NaN either way, and the
  // mixture's both-masked select replaces it); lp, lq, dAB are never NaN in a valid row.
  const T ts = tf - sf;
  const T b1 = max_nn(abs_nn(ts), abs_nn(dAB)), b2 = max_nn(abs_nn(lp), abs_nn(lq));
  const T f1 = ts - dAB;  // may overflow where lp - lq does not (|lp|, |lq| <= float max): then lp - lq
  if constexpr (M::kBounded) return b1 <= b2 ? f1 : lp - lq;  // |f1| < 2^102 + log V: finite
  const bool f1_finite = abs_nn(f1) < std::numeric_limits<T>::infinity();  // false for NaN
  return (b1 <= b2) & f1_finite ? f1 : lp - lq;
}

// lp - lq of an element of a row of 16-bit logits (bf16, fp16; the GPU kernels' bounded rows) from its raw logits t, s,
// with row constants c (a float of 8 significant bits near (m_t - m_s) / invT, the maxima's gap in raw units) and
//   dl = (A - B) - c invT  (in double, rounded once):    lp - lq = ((t - s) - c) invT - dl,
// two subtractions and one FFMA, where logit_gap takes two forms and chooses (7 instructions, plus tf = t invT).
// The subtractions are exact nearly always: t - s of two values of 8 (bf16) or 11 (fp16) significant bits is exact
// in float while their exponents differ by at most 16 (13), and the difference with c, of 8 bits near it, likewise.
// The gap then carries the FFMA's rounding alone, 2^-24 of itself, and dl's, one rounding of a value within log V
// of 0 common to the row, where logit_gap's forms carry 2^-24 (|lp| + |lq|) or the roundings of tf, sf and of dAB
// (2^-25 |A - B|, an offset between the rows' logits, in every element alike). Where t - s does round (a logit
// within 2^-16 of 0 beside the other's magnitude), its error is 2^-24 |t - s| invT <= 2^-24 (|lp| + |lq| + |A - B|),
// f1's. That bound is absolute, not relative to lp - lq: with c large it leaves nothing of a small gap (a student logit of
// 1e29 beside a teacher's 3: t - s rounds by 2^-24 1e29, and lp - lq = -2 came out 0; the H200, session 46, gave kl/pr
// 0.019 for a loss of 3.60), where logit_gap takes lp - lq. So the kernels take RawGap only on rows that raw_gap_ok
// admits (finite logits, |x / T| summed over the two sides' extremes <= 2^11: every error above <= 2^-13 absolute);
// other rows take the general policy and logit_gap. -inf gives -+inf as lp - lq does (both -inf: NaN, which the
// mixture's both-masked select replaces).
template <typename T>
struct RawGap {
  T b;      // (t - s) - c, from the element's raw logits
  T inv_t;  // 1 / T
  T dl;     // (A - B) - c inv_t
};
template <class M, typename T>
AMID_HD T logit_gap(T, T, T, T, const RawGap<T>& g) {
  return fma_t(g.b, g.inv_t, -g.dl);
}
// The row constants of RawGap, and an element's from its raw logits.
template <typename T>
struct RawGapRow {
  T c, inv_t, dl;
  AMID_HD RawGap<T> at(T t, T s) const { return RawGap<T>{(t - s) - c, inv_t, dl}; }
};
template <typename T>
AMID_HD RawGapRow<T> raw_gap_row(RowLse<T> A, RowLse<T> B, T inv_t) {
  const double dm = double(A.m) - double(B.m);
  // c: (m_t - m_s) / invT truncated to 8 significant bits (0 where that is not finite); c inv_t is exact in double.
  // Any c near it will do (dl takes the rest exactly): an approximate reciprocal, not a division (whose slow path,
  // a call, costs the kernels registers: a spill per row)
  const float cf = float(dm) * LibMath::rcp_approx(float(inv_t));
  const float c = (cf - cf == 0.0f) ? bit_cast<float>(bit_cast<uint32_t>(cf) & 0xffff0000u) : 0.0f;
  const double dl = (dm + (double(A.l) - double(B.l))) - double(c) * double(inv_t);
  return RawGapRow<T>{T(c), inv_t, T(dl)};
}
// Whether a row of 16-bit logits may take RawGap (above): from R1's extremes of the scaled logits x / T, the largest
// |t| plus the largest |s| at most 2^11, so that t - s, c and the FFMA's rounding leave at most 2^-13 of lp - lq (the
// 16-bit budgets are 2^-9 relative; a teacher offset by 700 from its student still qualifies). NaN fails.
constexpr double kRawGapMax = 2048;
template <typename T>
AMID_HD bool raw_gap_ok(T t_max, T s_max, T t_min, T s_min) {
  const T at = max_nn(abs_nn(t_max), abs_nn(t_min)), as = max_nn(abs_nn(s_max), abs_nn(s_min));
  return at + as <= T(kRawGapMax);
}
// The gap argument of the element functions (the _from_logits family): the row's dAB, or the element's RawGap.
template <typename T>
AMID_HD T gap_arg(T dAB, T, T) {
  return dAB;
}
template <typename T>
AMID_HD RawGap<T> gap_arg(const RawGapRow<T>& r, T t, T s) {
  return r.at(t, s);
}

// The mixture from the temperature-scaled logits tf, sf and their log-sum-exps A, B (dAB = A - B),
// returning lp and lq too; the one place that forms lp, lq and lp - lq from the logits (see
// mixture, logit_gap). The first form takes the mode as a template argument, the second reads it
// from P; the last two take single log-sum-exps (l = 0).
template <MixMode MODE, bool REF_P, class M, bool TINY_LAM = true, typename T, typename G>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T& lp, T& lq,
                                 T& lt, T& w, T& d) {
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  mixture<MODE, REF_P, M, TINY_LAM>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, dAB), lt, w, d);
}

template <bool REF_P, class M, typename T, typename G>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T& lp, T& lq,
                                 T& lt, T& w, T& d) {
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  mixture<REF_P, M>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, dAB), lt, w, d);
}

// The GPU kernels' split: POWER kernels compile only the power mean (kPower, the one mode with special
// functions); the others choose among the three cheap modes at run time, so that no kernel carries
// the power mean's code and registers beside a per-element switch.
template <bool POWER, bool REF_P, class M, typename T, typename G>
AMID_HD void mixture_from_logits_split(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T& lp,
                                       T& lq, T& lt, T& w, T& d) {
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  const T dpq = logit_gap<M>(tf, sf, lp, lq, dAB);
  if constexpr (POWER) {
    mixture<MixMode::kPower, REF_P, M>(P, lp, lq, dpq, lt, w, d);
  } else {
    switch (P.mode) {
      case MixMode::kStudent: mixture<MixMode::kStudent, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
      case MixMode::kTeacher: mixture<MixMode::kTeacher, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
      default: mixture<MixMode::kGeometric, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    }
  }
}

template <MixMode MODE, bool REF_P, class M, typename T>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, T A, T B, T& lp, T& lq, T& lt, T& w, T& d) {
  mixture_from_logits<MODE, REF_P, M>(P, tf, sf, RowLse<T>{A, T(0)}, RowLse<T>{B, T(0)}, A - B, lp, lq, lt, w, d);
}

template <bool REF_P, class M, typename T>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, T A, T B, T& lp, T& lq, T& lt, T& w, T& d) {
  mixture_from_logits<REF_P, M>(P, tf, sf, RowLse<T>{A, T(0)}, RowLse<T>{B, T(0)}, A - B, lp, lq, lt, w, d);
}

// The combined order's mixture from the logits (kJSD; see mixture_both), with the mode as a template
// argument or read from P, and single log-sum-exps A, B in the second form.
template <MixMode MODE, class M, bool TINY_LAM = true, typename T, typename G>
AMID_HD void mixture_both_from_logits(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T& lp,
                                      T& lq, T& lt, T& w, T& dp, T& dq) {
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  mixture_both<MODE, M, TINY_LAM>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, dAB), lt, w, dp, dq);
}

// The GPU kernels' split (see mixture_from_logits_split) for the combined order.
template <bool POWER, class M, typename T, typename G>
AMID_HD void mixture_both_from_logits_split(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB,
                                            T& lp, T& lq, T& lt, T& w, T& dp, T& dq) {
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  const T dpq = logit_gap<M>(tf, sf, lp, lq, dAB);
  if constexpr (POWER) {
    mixture_both<MixMode::kPower, M>(P, lp, lq, dpq, lt, w, dp, dq);
  } else {
    switch (P.mode) {
      case MixMode::kStudent: mixture_both<MixMode::kStudent, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
      case MixMode::kTeacher: mixture_both<MixMode::kTeacher, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
      default: mixture_both<MixMode::kGeometric, M>(P, lp, lq, dpq, lt, w, dp, dq); return;
    }
  }
}

template <class M, typename T>
AMID_HD void mixture_both_from_logits(const LossParams<T>& P, T tf, T sf, T A, T B, T& lp, T& lq, T& lt, T& w, T& dp,
                                      T& dq) {
  lp = log_prob<M>(tf, RowLse<T>{A, T(0)});
  lq = log_prob<M>(sf, RowLse<T>{B, T(0)});
  mixture_both<M>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, A - B), lt, w, dp, dq);
}

// tau = r~ - o for one element (o = e^l_ref, d = lt - l_ref), without cancellation when r~ ~ o.
// The row sum of tau is Sum r~ - 1 (taking Sum o = 1, as it is up to rounding), so
// Z = LSE(lt) = log1p(Sum tau): accurate where Z is small, unlike m + log(Sum e^(lt - m)), whose
// absolute error is eps |m| (spec §5.6).
template <class M, typename T>
AMID_HD T assistant_excess(T o, T d, T lt) {
  const bool near = d <= T(1);  // e^d <= e; false for d = +inf (o = 0)
  const T E = M::exp_approx(near ? d : lt);  // e^d - 1 only where |d| >= 1/2; E - o where E >= e o
  return near ? o * M::expm1_from_exp(d, E) : E - o;
}

// ------------------------------------------------------------------------------------------------
// The element terms of the alpha-beta loss, scaled so that no small exponent divides a difference
// of nearly equal powers (a, b -> 0; issue: ab_alpha = 1e-20 gave 0, ab_beta = 1e-8 in float32 the
// wrong sign). The divergence per element, relative to the reference side o (the non-assistant
// distribution) as for kl: with x the assistant, v = lx - lo, c its exponent in x^a y^b and g = a + b,
//   x^a y^b - (a/g) x^g - (b/g) y^g = o^g phi(v),  phi(v) = expm1(c v) - (c/g) expm1(g v)
// (the constant 1 - a/g - b/g is exactly 0), second order in v, and of order c dd, where dd = g - c is the
// other exponent (c dd = a b). So the terms are formed divided by it:
//   Pcd = o^g phi(v) / (c dd)          (the loss term is -Pcd),
//   Gd  = (x^g - o^dd x^c) / dd        (= dD/dlr: G),
//   Hc  = o^g expm1(c v) / c = Xc / c  (qr / rq: H = -Hc).
// Gd and Hc use expm1(y)/y for |y| < 1/2; Pcd is a series in v with row-constant coefficients for
// |g v| < 1/2, else from Hc and Xg = x^g - o^g (no cancellation there) by whichever of
// phi / (c dd) = (Hc - Xg / g) / dd  (c <= dd)  or  (Xg / g - Gd) / c  (c > dd)
// divides by the exponent that is not small. Masked sides (-inf) need no special case: every
// power is formed from logs (exp(-inf) = 0).
template <typename T>
struct AbTerms {
  T Pcd, Gd, Hc;
};

// What both forms of Pcd take (ab_terms_pow, ab_terms_one_series): Xg / g = (x^g - o^g) / g, for the big form, and
// the series in v for |g v| < 1/2.
template <typename T>
AMID_HD void ab_pcd_parts(const LossParams<T>& P, T v, T og, T xg, T& Xg_g, T& p_series) {
  Xg_g = (xg - og) * P.inv_g;
  p_series = -og * v * v * horner<0, std::is_same<T, double>::value ? kAbPhiTerms : kAbPhiTermsFloat>(P.ab_phi_cd, v);
}

// From the three powers o^g, x^g and x^c o^dd: the online row sums (amid_online.h) form them from terms they
// already have, relative to the unnormalised assistant (v = lt - lo there; the closing formulas shift by Z).
template <class M, typename T>
AMID_HD AbTerms<T> ab_terms_pow(const LossParams<T>& P, T v, T og, T xg, T xc_od) {
  const T c = P.ab_c, dd = P.ab_d, g = P.ab_g;
  const T cv = c * v, dv = dd * v, gv = g * v;
  const bool small_c = std::fabs(cv) < T(0.5);  // false for NaN / inf v
  const bool small_d = std::fabs(dv) < T(0.5);
  const bool small_g = std::fabs(gv) < T(0.5);
  AbTerms<T> r;
  r.Gd = small_d ? xc_od * v * M::expm1_div(dv) : (xg - xc_od) * P.inv_d;
  r.Hc = small_c ? og * v * M::expm1_div(cv) : (xc_od - og) * P.inv_c;
  T Xg_g, p_series;
  ab_pcd_parts(P, v, og, xg, Xg_g, p_series);
  const T p_big = c <= dd ? (r.Hc - Xg_g) * P.inv_d : (Xg_g - r.Gd) * P.inv_c;
  r.Pcd = small_g ? p_series : p_big;
  return r;
}

// The same terms with one expm1 series where ab_terms_pow takes two (R2: amid_online.h, RowAcc::add, which sums all
// three). Of Hc = o^g expm1(c v) / c and Gd = x^c o^dd expm1(dd v) / dd it forms the one whose exponent e_s is the
// smaller (Hc where c <= dd, else Gd) as ab_terms_pow does: Ts, the series term, and Pcd from it by ab_terms_pow's
// forms (the big one divides by the larger exponent, as there). The other term is To = Ts + ab_other_g Pcd (Gd = Hc -
// g Pcd, exact: Pcd dd = Hc - Xg / g, so Hc - g Pcd = (Xg - c Hc) / dd), which the row sums take from the sums of Ts
// and Pcd (RowAcc::finalize: linear in both, as are their w-weighted sums), so no element forms it or selects which
// is which (a row constant; RowAcc::add says what that saved). That sum loses no more than
// the terms' own rounding: where |g v| < 1/2 the two addends are O(v) and O(v^2); beyond, it carries ~eps max(o^g,
// x^g, x^c o^dd) / e_big absolutely, as Pcd's big form and the larger of Hc, Gd do (where it is the smaller, e.g. Gd
// ~ x^c o^dd / dd << Hc ~ o^g / c for v -> -inf, it is relatively worse, but the element's gradient and the row sums
// hold the larger one with that error anyway).
// Row constants: LossParams::ab_e_s, inv_e_s, ab_pcd_k, ab_other_g (which side is which: two selects per element).
template <typename T>
struct AbSeriesTerms {
  T Pcd, Ts;  // Ts: Hc where ab_c <= ab_d, else Gd (ab_series_is_gd)
};
template <typename T>
AMID_HD bool ab_series_is_gd(const LossParams<T>& P) {
  return P.ab_c > P.ab_d;
}
template <class M, typename T>
AMID_HD AbSeriesTerms<T> ab_terms_one_series(const LossParams<T>& P, T v, T og, T xg, T xc_od) {
  const bool gd_series = ab_series_is_gd(P);  // (a row constant)
  const T base = gd_series ? xc_od : og;   // the series term's factor: o^g for Hc, x^c o^dd for Gd
  const T top = gd_series ? xg : xc_od;    // its big form: (top - base) / e_s
  const T sv = P.ab_e_s * v, gv = P.ab_g * v;
  const bool small_s = std::fabs(sv) < T(0.5);  // false for NaN / inf v
  const bool small_g = std::fabs(gv) < T(0.5);
  AbSeriesTerms<T> r;
  r.Ts = small_s ? base * v * M::expm1_div(sv) : (top - base) * P.inv_e_s;
  T Xg_g, p_series;
  ab_pcd_parts(P, v, og, xg, Xg_g, p_series);
  r.Pcd = small_g ? p_series : (r.Ts - Xg_g) * P.ab_pcd_k;
  return r;
}

template <class M, typename T>
AMID_HD AbTerms<T> ab_terms(const LossParams<T>& P, T lo, T lx, T v) {
  // o^g, x^g, x^c o^dd by exp2_approx: arguments <= 0 (a, b > 0), and the big forms subtract two of them
  // only where their ratio is at least e^(1/2) (|y| >= 1/2), which amplifies its relative error at most 2.6x.
  // (The exponents times log2(e) are row constants: one rounding of the argument, as g lo had before its product
  // with log2(e) added a second.)
  const T og = M::exp2_approx(P.ab_g_log2e * lo), xg = M::exp2_approx(P.ab_g_log2e * lx);
  const T xc_od = M::exp2_approx(P.ab_c_log2e * lx + P.ab_d_log2e * lo);
  return ab_terms_pow<M>(P, v, og, xg, xc_od);
}

// ------------------------------------------------------------------------------------------------
// Per-element loss term l (summing to the row loss L) and the two gradient terms, from the
// probabilities, their logs, and e = lr - l_ref (formed by the caller as d - Z: accurate when r ~
// the reference side, where lr - l_ref itself would cancel).
//
// The gradient of the row loss is, with G = dF/dlr and H = dF/dlq (explicit part),
//   w (G - r S_G) + H - q K,   S_G = sum G,   K = sum G w - Wbar S_G + sum H.
// For kl, S_G and K are 1 + O(loss) (or -1, or 0), so the terms are returned shifted by those
// constants, G' = G - r S0 and H' = H - q K0, and the row sums of G', H' replace S_G, K:
//   w (G' - r S_G') + H' - q K',  S_G' = sum G',  K' = sum G' w - Wbar S_G' + sum H'
// (the same form; exact with Sum r = Sum q = 1). Nothing then adds or subtracts 1 from a small
// number. S0, K0: pr (-1, 0), qr (-1, 1), rp (1, 0), rq (1, -1). kl uses the official masked
// semantics: where a logit is -inf the loss term and G, H are dropped while r~ stays in Z, so there
// G' = -r S0, H' = -q K0. ab needs no mask (exp(-inf) = 0) and no shift (S0 = K0 = 0).
// (e^x - 1 - x) / x^2 and (1 + (x - 1) e^x) / x^2 for |x| < 1/2: the second-order KL element
// functions divided by x^2 (Taylor coefficients 1/n! and (n-1)/n!, n >= 2). In float, degree-5 polynomials
// fitted for relative error on [-1/2, 1/2] (discrete minimax, the constant 1/2 fixed; their float coefficients,
// evaluated exactly, are within 7.3e-8 and 2.3e-7), two and three FMAs fewer than the 8- and 9-term Taylor forms:
// 1.8 and 4.5 ulp evaluated with FMA. The loss needs them to ~1e-6 relative (its budget is 1e-5; tests/cpp:
// test_float_series).
template <typename T>
AMID_HD T phi1_div(T x) {
  if constexpr (std::is_same<T, float>::value) {
    const float c[6] = {0.5f, 0.1666666865348816f, 0.041665852069854736f, 0.00833395216614008f,
                        0.0013982654782012105f, 0.00019620649982243776f};
    return horner<0, 6>(c, x);
  } else {
    const T c[13] = {T(1.0 / 2), T(1.0 / 6), T(1.0 / 24), T(1.0 / 120), T(1.0 / 720), T(1.0 / 5040),
                     T(1.0 / 40320), T(1.0 / 362880), T(1.0 / 3628800), T(1.0 / 39916800),
                     T(1.0 / 479001600), T(1.0 / 6227020800.0), T(1.0 / 87178291200.0)};
    return horner<0, 13>(c, x);
  }
}
template <typename T>
AMID_HD T phi2_div(T x) {
  if constexpr (std::is_same<T, float>::value) {
    const float c[6] = {0.5f, 0.33333316445350647f, 0.12499527633190155f, 0.03333606198430061f,
                        0.007005203980952501f, 0.0011866962304338813f};
    return horner<0, 6>(c, x);
  } else {
    const T c[13] = {T(1.0 / 2), T(2.0 / 6), T(3.0 / 24), T(4.0 / 120), T(5.0 / 720), T(6.0 / 5040),
                     T(7.0 / 40320), T(8.0 / 362880), T(9.0 / 3628800), T(10.0 / 39916800),
                     T(11.0 / 479001600), T(12.0 / 6227020800.0), T(13.0 / 87178291200.0)};
    return horner<0, 13>(c, x);
  }
}

template <typename T>
struct Terms {
  T l, G, H;
  // kl only: the first-order loss term (-ref e or r e where kept, 0 where masked) and the size of
  // l's rounding error (|l| where kept; r + ref where masked: l = +-(r - ref) is a difference of
  // those two); see kl_row_loss.
  T l1 = T(0), lb = T(0);
};

template <Divergence D, Order O, class M, typename T>
AMID_HD Terms<T> element_terms(const LossParams<T>& P, T p, T q, T r, T lp, T lq, T lr, T e) {
  Terms<T> o;
  if constexpr (D == Divergence::kKL) {
    const bool keep = M::kBounded || ((lp != neg_inf<T>()) & (lq != neg_inf<T>()));
    const T ref = ref_is_p<O>() ? p : q;
    // r - ref: ref expm1(e) near r = ref, the plain difference once |e| >= 1/2 (no cancellation).
    const bool small = std::fabs(e) < T(0.5);
    const T diff = small ? ref * M::expm1_small(e) : r - ref;
    // The loss term in second-order form, exact where the divergence is tiny (spec §5.6): with
    // sum r = sum ref = 1, KL(ref || r) = sum ref (e^e - 1 - e) and KL(r || ref) = sum ref (1 + (e - 1) e^e),
    // both >= 0 per element and O(e^2), so no first-order terms cancel in the row sum. Masked
    // elements (dropped terms) keep the identity exact with the term +-(r - ref) (element_terms' l).
    const T e2 = e * e;
    T l, G, H, G_out, H_out, l_out;
    if constexpr (O == Order::kPR || O == Order::kQR) {  // KL(x || r): l = x (lx - lr) = -x e
      l = small ? ref * e2 * phi1_div(e) : diff - ref * e;
      l_out = r - ref;
      G = diff;                                    // -x + r
      H = O == Order::kQR ? -q * e : T(0);         // q (1 - e) - q
      G_out = r;
      H_out = O == Order::kQR ? -q : T(0);
    } else {  // KL(r || y): l = r (lr - ly) = r e
      l = small ? ref * e2 * phi2_div(e) : r * e - diff;
      l_out = ref - r;
      G = r * e;                                   // r (e + 1) - r
      H = O == Order::kRQ ? -diff : T(0);          // -r + q
      G_out = -r;
      H_out = O == Order::kRQ ? q : T(0);
    }
    o.l = keep ? l : l_out;
    o.G = keep ? G : G_out;
    o.H = keep ? H : H_out;
    o.l1 = keep ? (O == Order::kPR || O == Order::kQR ? -ref * e : r * e) : T(0);
    o.lb = keep ? (l < T(0) ? -l : l) : r + ref;
  } else {
    // alpha-beta divergence D(x||y) = -(1/(ab)) sum[x^a y^b - (a/g) x^g - (b/g) y^g], g = a + b,
    // dD/dlx = (x^g - x^a y^b)/b, dD/dly = (y^g - x^a y^b)/a; with the assistant's exponent c and
    // the other one dd (ab_terms, v = e = lr - l_ref): l = -Pcd, G = dD/dlr = Gd, and
    // qr: H = dD/dlq = -Xc/b, rq: H = -Xc/a, both -Hc (c = b in qr, a in rq).
    const T lo = ref_is_p<O>() ? lp : lq;
    const AbTerms<T> t = ab_terms<M>(P, lo, lr, e);
    o.l = -t.Pcd;
    o.G = t.Gd;
    o.H = (O == Order::kQR || O == Order::kRQ) ? -t.Hc : T(0);
  }
  return o;
}

// The combined order (kJSD): the terms of pr (with lr_a = lt - Z, e_p = dp - Z) and of qr (with
// lr_b = lt - Z2, e_q = dq - Z2), each with its own second-order form and its own Z: Z from the
// excesses over p, Z2 from those over q (stats kStatZ, kStatZ2). In float the two differ by the
// rounding of the row's log-sum-exps (sum p and sum q are 1 only up to it), and a term evaluated with
// the other's Z is off at first order in the small-divergence regime (measured: 2e-4 normwise in the
// gradient for a student within 1% of its teacher). The gradient terms of lam pr + (1 - lam) qr:
// the lemma is linear in (G, H), so the combined G, H (and their row sums S_G, K) are the weighted
// sums; for kl the shifts add up too (S0 = -1, K0 = 1 - lam). The loss terms stay separate (pr in a,
// qr in b) so that each row loss picks its own error bound (kl_row_loss) before they are combined.
template <typename T>
struct JsdTerms {
  Terms<T> a, b;  // pr, qr (each unweighted)
  T G, H;         // lam a.G + (1 - lam) b.G, lam a.H + (1 - lam) b.H
};

template <Divergence D, class M, typename T>
AMID_HD JsdTerms<T> jsd_terms(const LossParams<T>& P, T p, T q, T r, T lp, T lq, T lr_a, T lr_b, T e_p, T e_q) {
  JsdTerms<T> o;
  o.a = element_terms<D, Order::kPR, M>(P, p, q, r, lp, lq, lr_a, e_p);
  o.b = element_terms<D, Order::kQR, M>(P, p, q, r, lp, lq, lr_b, e_q);
  o.G = P.lam * o.a.G + P.one_minus_lam * o.b.G;
  o.H = P.lam * o.a.H + P.one_minus_lam * o.b.H;
  return o;
}

// Gradient of the row loss with respect to the temperature-scaled student logits, for one element
// (G, H, S_G, K shifted for kl as above).
template <typename T>
AMID_HD T element_grad(bool detach, T w, T q, T r, const Terms<T>& o, T S_G, T K) {
  return detach ? o.H - q * K : w * (o.G - r * S_G) + o.H - q * K;
}

// One element's gradient from its mixture (lt, w, d) and the row statistics (single orders).
template <Divergence D, Order O, class M, typename T>
AMID_HD T grad_from_mixture(const LossParams<T>& P, T lp, T lq, T lt, T w, T d, T Z, T S_G, T K) {
  const T lr = lt - Z;
  const T p = M::exp_approx(lp), q = M::exp_approx(lq), r = M::exp_approx(lr);
  const Terms<T> o = element_terms<D, O, M>(P, p, q, r, lp, lq, lr, d - Z);
  // (make_params admits a detached assistant in qr and rq only: in pr and rp the flag is known false, and the GPU's W
  // no longer selects between the two forms per element, one instruction per element of kl/pr in bf16)
  return element_grad((O == Order::kQR || O == Order::kRQ) && P.detach, w, q, r, o, S_G, K);
}

// W's mixture of one element from its logits (single orders): POWER as in mixture_from_logits_split, with lt and w
// from R2's kept term (power_mixture_from_kept: one exponential, no reciprocal, no tiny-lam scaling) where R2 took
// the reciprocal. The W pass and the online kernels' exact pass (amid_online.h: ExactAcc) both take it.
template <Order O, bool POWER, class M, typename T, typename G>
AMID_HD void w_mixture(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T& lp, T& lq, T& lt, T& w,
                       T& d) {
  static_assert(O != Order::kJSD, "w_mixture: single orders only (kJSD: mixture_both_from_logits_split)");
  if constexpr (POWER) {  // as from R2's kept term (w_mixture_c): the same values
    lp = log_prob<M>(tf, A);
    lq = log_prob<M>(sf, B);
    // R2's kept term (add_from_logits_c: power_kept of mixture's c and d, d before the both-masked select, which
    // power_kept does not read there), then the mixture from it as the resident W takes it (see w_mixture_c)
    const T dpq = logit_gap<M>(tf, sf, lp, lq, dAB);
    const PowerPre<T> m = power_pre<ref_is_p<O>(), M>(P, dpq);
    const T c = power_log<ref_is_p<O>(), M, true>(P, m);
    T lt_, d_;
    power_lt_d<ref_is_p<O>()>(m, c, lp, lq, dpq, lt_, d_);
    power_mixture_from_kept<ref_is_p<O>(), M>(P, lp, lq, lp - lq, power_kept<M>(lp, lq, c, d_), lt, w, d);
  } else {
    mixture_from_logits_split<POWER, ref_is_p<O>(), M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, d);
  }
}

// The same for the power mean of a single order, from the element's term kept from R2 (power_kept: d, or c
// where a side is masked; the GPU's resident W pass): no logarithm, the same values as w_mixture bit for bit.
template <Order O, class M, typename T>
AMID_HD void w_mixture_c(const LossParams<T>& P, T tf, T sf, T kept, RowLse<T> A, RowLse<T> B, T& lp, T& lq, T& lt,
                         T& w, T& d) {
  static_assert(O != Order::kJSD, "w_mixture_c: single orders only (kJSD has two logarithm terms)");
  lp = log_prob<M>(tf, A);
  lq = log_prob<M>(sf, B);
  // lp - lq itself, not logit_gap's accurate form: from the kept term, the logit gap enters w through
  // k (lt - lq) or k (lt - lp) where that side is the smaller (a relative error of ~k eps max(|lp|, |lq|) of it),
  // and (masked sides, c) selects c's form, whose forms agree at its edges (|x| = 0 and 80).
  power_mixture_from_kept<ref_is_p<O>(), M>(P, lp, lq, lp - lq, kept, lt, w, d);
}

// The combined order's gradient of one element from its mixture and the row statistics (Z for the pr
// terms, Z2 for the qr ones: jsd_terms).
template <Divergence D, class M, typename T>
AMID_HD T grad_from_mixture_both(const LossParams<T>& P, T lp, T lq, T lt, T w, T dp, T dq, T Z, T Z2, T S_G, T K) {
  const T lr = lt - Z;
  const T p = M::exp_approx(lp), q = M::exp_approx(lq), r = M::exp_approx(lr);
  const JsdTerms<T> jt = jsd_terms<D, M>(P, p, q, r, lp, lq, lr, lt - Z2, dp - Z, dq - Z2);
  const Terms<T> o{T(0), jt.G, jt.H};
  return element_grad(false, w, q, r, o, S_G, K);
}

// The gradient of one element from the row statistics, divided by the caller's scale (the W pass of
// the GPU kernels; the C++ tests run it on the host in float): W's mixture (w_mixture; for kJSD R2's own),
// then the element's terms.
template <Divergence D, Order O, bool POWER, class M, typename T, typename G>
AMID_HD T grad_from_logits(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T Z, T Z2, T S_G,
                           T K) {
  if constexpr (O == Order::kJSD) {
    T lp, lq, lt, w, dp, dq;
    // R2's w (its reciprocal form): power_pre_both has e^-|x| and e^|x| for the two sides' logarithm terms, so w
    // costs one reciprocal there, where the single orders' W (from the kept term, without e) takes one exponential
    mixture_both_from_logits_split<POWER, M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, dp, dq);
    return grad_from_mixture_both<D, M>(P, lp, lq, lt, w, dp, dq, Z, Z2, S_G, K);
  } else {
    T lp, lq, lt, w, d;
    w_mixture<O, POWER, M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, d);
    return grad_from_mixture<D, O, M>(P, lp, lq, lt, w, d, Z, S_G, K);
  }
}

// x^N for N a power of two: log2(N) squarings.
template <int N, typename T>
AMID_HD T pow_pow2(T x) {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "pow_pow2: expected N a power of two");
  if constexpr (N == 1) {
    return x;
  } else {
    const T h = pow_pow2<N / 2>(x);
    return h * h;
  }
}

// W of kl/pr and kl/qr at k = 1 / N, N a power of two (LossParams::pow_n; N = 4 is alpha = 0.5, the library's
// default), in a near row under wide weights (float; the streaming kernels' W, which recomputes the mixture): with B
// the side whose k-th power is the larger (b its probability, lam_B its weight, N the other side) and E = e^-|x| from
// power_pre, the power mean is r~ = b s^N, s = lam_B + lam_N E (the sum whose logarithm power_log takes), and the
// other side's probability is b e^-|lp - lq| = b E^N (x = k (lp - lq) exactly: k is a power of two). So p, q and r
// come from one exponential (b) and squarings, where grad_from_logits takes three (p, q, r = e^(lt - Z)) and a fourth
// for w (from d, power_mixture_from_kept); w = (1 - lam) (q / b)^k / s by one reciprocal of s. The row constant
// e^-Z enters through the weights (Pow2Row: s' = s e^(-k Z), so r = b s'^N), and with it the element terms'
// e = d - Z = (ln s' + [non-own form] |x|) / k: power_log's logarithm (its series where |x| < 1/2, then minus Z).
// 4 MUFU per element (E, b, the logarithm, the reciprocal) where grad_from_logits takes 6. Not bit for bit the
// recomputing W's values (nor the kept-term W's): r and b E^N carry the squarings' roundings, N times the relative
// error of E and s (~2^-22 each), and E^N of the smaller side is absolutely within 2^-24 of b (its relative error,
// N |x| 2^-24 from E's argument, grows only where it is a vanishing share of b). tests/cpp (gpu_row) measures it
// against float64 and against that W. Not rp / rq: there G = r e, with e up to the logit gap (~90 in rows far apart),
// and the shifted sums cancel r e against S_G only where W's r has R2's rounding (e^(lt - Z) from the same lt); with
// this r the emulated gradient of such rows was 5x the recomputing W's error (5.5e-5 against 1e-5 of the largest
// element, tests/cpp test_fixed_shift_rows, kl/rp alpha 0.5 lam 0.5), pr / qr within it.
// The N the GPU kernels compile it for (each N is one more W per streaming kl/pr, kl/qr kernel): 4, alpha = 0.5 (the
// library's default), and 1, alpha = -1 (the arithmetic mixture lam p + (1 - lam) q: DistiLLM's skew KLs, kl/pr and
// kl/qr; s' itself is r / b, no squaring).
constexpr int kPow2N = 4;
constexpr int kPow2NArith = 1;
template <typename T>
struct Pow2Row {
  T s_ref, s_nonref;  // the weights of the loss's reference side and of the other, times e^(-k Z)
  T w_num;            // (1 - lam) e^(-k Z): w = w_num (q / b)^k / s'
  T Z;
};
// w_scale multiplies w (w_num): kl/pr's gradient, w (G - r S_G) - q K (H = 0), takes a row's scale through w and K
// instead of one product per element (the caller passes K times it too; 1: the unscaled gradient).
template <bool REF_P, typename T>
AMID_HD Pow2Row<T> pow2_row(const LossParams<T>& P, T Z, T w_scale = T(1)) {
  const T c = T(::exp(-double(P.k) * double(Z)));  // (once per row: in double)
  Pow2Row<T> R;
  R.s_ref = (REF_P ? P.lam : P.one_minus_lam) * c;
  R.s_nonref = (REF_P ? P.one_minus_lam : P.lam) * c;
  R.w_num = T(double(P.one_minus_lam) * double(c) * double(w_scale));
  R.Z = Z;
  return R;
}
template <Divergence D, Order O, int N, class M, typename T, typename G>
AMID_HD T grad_from_logits_pow2(const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G gap,
                                const Pow2Row<T>& R, T S_G, T K) {
  static_assert(D == Divergence::kKL && (O == Order::kPR || O == Order::kQR), "grad_from_logits_pow2: kl/pr, kl/qr only");
  static_assert(M::kNearGaps && M::kBounded && kSplitLog<M, T>, "grad_from_logits_pow2: near bounded rows, float, "
                                                                 "wide weights (E = e^-|x| in every form)");
  constexpr bool REF_P = ref_is_p<O>();
  const T lp = log_prob<M>(tf, A), lq = log_prob<M>(sf, B);
  const T dpq = logit_gap<M>(tf, sf, lp, lq, gap);
  const PowerPre<T> m = power_pre<REF_P, M>(P, dpq);  // (its w is R2's form: unused here)
  // s' as power_log's sum (the own form: B is the reference side), scaled; e by power_log's series where |x| < 1/2,
  // else from the logarithm (base = own: no far-gap form; |x| / k = |lp - lq| exactly)
  const T s = m.own ? R.s_ref + R.s_nonref * m.E : R.s_nonref + R.s_ref * m.E;
  const T ser = m.sx * horner<0, kMixTerms>(P.mix_h2[REF_P ? 0 : 1], m.sx);  // (kSplitLog: base 2)
  const T e_log = M::log2_fma(s, P.ln2_inv_k, m.base ? T(0) : std::fabs(dpq));  // (both formed: a select, no branch)
  const T e = m.ax > T(-0.5 * kLog2e) ? ser - R.Z : e_log;
  const T b = M::exp_approx(m.q_base ? lq : lp);
  const T o = b * pow_pow2<N>(m.E);
  const T p = m.q_base ? o : b, q = m.q_base ? b : o;
  const T r = b * pow_pow2<N>(s);
  const T w = M::rcp_approx(s) * (m.q_base ? R.w_num : R.w_num * m.E);
  const Terms<T> t = element_terms<D, O, M>(P, p, q, r, lp, lq, (REF_P ? lp : lq) + e, e);
  return element_grad((O == Order::kQR || O == Order::kRQ) && P.detach, w, q, r, t, S_G, K);
}

// The same for the power mean of a single order, from the element's term kept from R2 (power_kept; the GPU's
// resident W pass): no logarithm, the same value as grad_from_logits bit for bit.
template <Divergence D, Order O, class M, typename T>
AMID_HD T grad_from_logits_c(const LossParams<T>& P, T tf, T sf, T kept, RowLse<T> A, RowLse<T> B, T Z, T S_G, T K) {
  T lp, lq, lt, w, d;
  w_mixture_c<O, M>(P, tf, sf, kept, A, B, lp, lq, lt, w, d);
  return grad_from_mixture<D, O, M>(P, lp, lq, lt, w, d, Z, S_G, K);
}

// W of the alpha-beta orders whose reference is q (qr, rq) from three kept values: d = lt - lq, q and q^g, as a
// bounded R2 formed them (amid_online.h: add_from_logits_c3; the 16-bit resident kernels keep q where the row's logits
// were, and q^g beside d). Recomputed, W takes six exponentials per element (q, r, w, q^g, r^g, r^c q^dd); from these,
// four. With v = d - Z = lr - lq, every alpha-beta term is q^g times a function of v, and r = q e^v:
//   r^g = q^g e^gv,  r^c q^dd = q^g e^cv,
// so ab_terms_pow of (1, e^gv, e^cv) gives Gd / q^g and Hc / q^g, and w = (1 - lam) e^-kd (w's own form from d):
//   grad = q^g (w Gd' - Hc') - q (w e^v S_G + K)   (detached: w = 0).
// q itself is R2's (exp_corrected of lq): the gradient's q K, which cancels against the other terms where the student is
// peaked (q ~ 1, K ~ 4 beside a gradient of 4e-3 in tests/cpp), keeps W's accuracy; a q formed as r~ e^-d (kept r~)
// carried |d| 2^-24 more and was off by 7e-4 there. Products of powers, so each factor must stay finite and normal where
// the product matters: e^v <= e^(d_max - Z), d <= max(0, lp - lq) (r~ is a mean of p and q), Z >= -14 while R2's fixed
// shift holds (S >= 2^-20; after a rerun of R2 the kernel's W takes d alone), and q, q^g normal: a row takes these values
// where max(1, g) (max(0, max(lp - lq)) + 14) <= 80 and max(1, g) (-min lq) <= 80 (ab_kept3_row_ok, from R1's extremes
// as near_gaps; ordinary rows). w from d alone: its error is ~2^-21 absolute, not relative to 1 - w (W-from-d's form
// takes lp - lq for that); the C++ tests measure the gradient against double (test_kept3_w, test_online_float).
constexpr double kKept3MaxExp = 80.0;
constexpr double kKept3MinZ = -14.0;  // (fixed shift: S >= 2^-20, Z >= -13.87)
template <typename T>
AMID_HD bool ab_kept3_row_ok(const LossParams<T>& P, T t_max, T s_min, RowLse<T> B, T dAB) {
  const double e = P.ab_g > T(1) ? double(P.ab_g) : 1.0;
  const double dpq_max = (double(t_max) - double(s_min)) - double(dAB);
  const double lq_min = double(s_min) - (double(B.m) + double(B.l));
  return e * ((dpq_max > 0 ? dpq_max : 0.0) - kKept3MinZ) <= kKept3MaxExp && e * -lq_min <= kKept3MaxExp;
}
// The row constants of ab_grad_from_kept3. log2_w: log2(1 - lam), or -inf when the gradient is detached (P.detach:
// w = 0 drops the terms through the mixture, exactly as element_grad's detached form, without a branch per element).
template <typename T>
struct Kept3Row {
  T Z, nzl2, S_G, K, log2_w;  // Z, -Z log2(e), S_G, K, log2(1 - lam) or -inf
};
template <typename T>
AMID_HD Kept3Row<T> kept3_row(const LossParams<T>& P, T Z, T S_G, T K) {
  return {Z, -Z * T(kLog2e), S_G, K, P.detach ? neg_inf<T>() : P.log2_1m_lam};
}
template <Order O, class M, typename T>
AMID_HD T ab_grad_from_kept3(const LossParams<T>& P, T d, T q, T qg, const Kept3Row<T>& R) {
  static_assert(O == Order::kQR || O == Order::kRQ, "ab_grad_from_kept3: the orders whose reference is q");
  const T v = d - R.Z;
  const T ev = M::exp2_approx(fma_t(d, T(kLog2e), R.nzl2));   // r / q
  const T xg = M::exp2_approx(P.ab_g_log2e * v);              // r^g / q^g
  const T xc_od = M::exp2_approx(P.ab_c_log2e * v);           // r^c q^dd / q^g
  const AbTerms<T> t = ab_terms_pow<M>(P, v, T(1), xg, xc_od);  // (Pcd unused: the loss is R2's)
  const T w = M::exp2_approx(R.log2_w - P.k_log2e * d);        // (0 when detached)
  return qg * (w * t.Gd - t.Hc) - q * (w * ev * R.S_G + R.K);
}

// The kl row loss: the sum of the second-order terms Terms::l or of the first-order ones l1, whichever
// carries the smaller rounding error. Both are exact in exact arithmetic; sum l is exact to the last
// bit for a tiny divergence (every term >= 0, O(e^2)), but with -inf masks its masked corrections
// (+-(r - ref), each off by eps (r + ref)) can cancel against the rest; sum l1 depends on Z at
// first order. Error bounds, in units of eps: sum lb and sum |l1| + |Z|.
template <typename S>
AMID_HD S kl_first_order_bound(S abs_l1, S Z) {
  return abs_l1 + (Z < S(0) ? -Z : Z);
}
template <typename S>
AMID_HD S kl_row_loss(S sum_l, S bound_l, S sum_l1, S abs_l1, S Z) {
  return bound_l <= kl_first_order_bound(abs_l1, Z) ? sum_l : sum_l1;
}

// The error bound of kl_row_loss's choice, in the same units.
template <typename S>
AMID_HD S kl_row_bound(S bound_l, S abs_l1, S Z) {
  const S b1 = kl_first_order_bound(abs_l1, Z);
  return bound_l <= b1 ? bound_l : b1;
}

// The row scalar K of the gradient from the row sums; detached, only the explicit part stays.
template <typename S>
AMID_HD S row_K(bool detach, S S_G, S S_Gw, S S_H, S Wbar) {
  return detach ? S_H : S_Gw - Wbar * S_G + S_H;
}

// ------------------------------------------------------------------------------------------------
// Dispatch helpers: call f with the divergence / order / mixture mode as compile-time constants.

template <Divergence D>
using DivC = std::integral_constant<Divergence, D>;
template <Order O>
using OrderC = std::integral_constant<Order, O>;
template <MixMode MODE>
using ModeC = std::integral_constant<MixMode, MODE>;

template <typename F>
inline void dispatch_loss(Divergence d, Order o, F&& f) {
  auto with_order = [&](auto dc) {
    switch (o) {
      case Order::kPR: f(dc, OrderC<Order::kPR>{}); break;
      case Order::kQR: f(dc, OrderC<Order::kQR>{}); break;
      case Order::kRP: f(dc, OrderC<Order::kRP>{}); break;
      case Order::kJSD: f(dc, OrderC<Order::kJSD>{}); break;
      default: f(dc, OrderC<Order::kRQ>{}); break;
    }
  };
  if (d == Divergence::kKL) {
    with_order(DivC<Divergence::kKL>{});
  } else {
    with_order(DivC<Divergence::kAB>{});
  }
}

template <typename F>
inline void dispatch_mode(MixMode m, F&& f) {
  switch (m) {
    case MixMode::kStudent: f(ModeC<MixMode::kStudent>{}); break;
    case MixMode::kTeacher: f(ModeC<MixMode::kTeacher>{}); break;
    case MixMode::kGeometric: f(ModeC<MixMode::kGeometric>{}); break;
    default: f(ModeC<MixMode::kPower>{}); break;
  }
}

}  // namespace amid
