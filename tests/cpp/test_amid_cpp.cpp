// C++ tests (ctest) of what Python cannot see: the C++ API of ops.h works from libtorch alone, and
// every schema of tests/op_schemas.txt resolves through the dispatcher. The numerics are tested in
// depth by the Python suite; here one configuration is checked against a naive double loop, and the
// gradient against central finite differences.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "ops.h"

static int failures = 0;
#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond)) {                                              \
      ++failures;                                               \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
    }                                                           \
  } while (0)

// KL(p || r) with r the alpha-mixture, straight from the definition, in probability space.
static double naive_row_loss(const double* s, const double* t, int64_t V, double alpha, double lam) {
  std::vector<double> p(V), q(V), r(V);
  double zs = 0, zt = 0, zr = 0;
  for (int64_t v = 0; v < V; ++v) zt += std::exp(t[v]), zs += std::exp(s[v]);
  const double k = 0.5 * (1 - alpha);
  for (int64_t v = 0; v < V; ++v) {
    p[v] = std::exp(t[v]) / zt;
    q[v] = std::exp(s[v]) / zs;
    r[v] = std::pow(lam * std::pow(p[v], k) + (1 - lam) * std::pow(q[v], k), 1 / k);
    zr += r[v];
  }
  double L = 0;
  for (int64_t v = 0; v < V; ++v) L += p[v] * std::log(p[v] / (r[v] / zr));
  return L;
}

int main(int argc, char** argv) {
  // 1. Schemas.
  if (argc > 1) {
    std::ifstream f(argv[1]);
    std::string line;
    int n = 0;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      const auto paren = line.find('(');
      const auto name = line.substr(0, paren);
      auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
      EXPECT(handle.has_value());
      if (handle) {
        std::ostringstream os;
        os << handle->schema();
        EXPECT(os.str() == line);
        if (os.str() != line) std::fprintf(stderr, "  registered: %s\n  golden:     %s\n", os.str().c_str(), line.c_str());
      }
      ++n;
    }
    EXPECT(n == 4);
  }

  // 2. Forward against the naive loop, and the gradient against finite differences.
  const int64_t N = 3, V = 17;
  const double alpha = 0.5, lam = 0.3;
  at::manual_seed(0);
  at::Tensor s = at::randn({N, V}, at::kDouble) * 2, t = at::randn({N, V}, at::kDouble) * 2;
  auto [loss, stats, grad] =
      amid::amid_loss_fwd(s, t, std::nullopt, alpha, lam, "kl", "pr", 0.2, 0.7, 1.0, false, true);
  for (int64_t n = 0; n < N; ++n) {
    const double want = naive_row_loss(s[n].data_ptr<double>(), t[n].data_ptr<double>(), V, alpha, lam);
    EXPECT(std::abs(loss[n].item<double>() - want) < 1e-12);
  }
  const double h = 1e-6;
  for (int64_t v = 0; v < V; v += 5) {
    at::Tensor sp = s.clone(), sm = s.clone();
    sp[1][v] += h;
    sm[1][v] -= h;
    const double fd = (naive_row_loss(sp[1].data_ptr<double>(), t[1].data_ptr<double>(), V, alpha, lam) -
                       naive_row_loss(sm[1].data_ptr<double>(), t[1].data_ptr<double>(), V, alpha, lam)) / (2 * h);
    EXPECT(std::abs(grad[1][v].item<double>() - fd) < 1e-8);
  }
  // The recompute backward agrees with the gradient written in the forward.
  at::Tensor ones = at::ones({N}, at::kDouble);
  at::Tensor g2 = amid::amid_loss_bwd(ones, s, t, std::nullopt, stats, alpha, lam, "kl", "pr", 0.2, 0.7, 1.0, false);
  EXPECT(at::allclose(grad, g2, 1e-12, 1e-14));
  // scale_grad_ applies per-row factors in place.
  at::Tensor g3 = grad.clone();
  amid::scale_grad_(g3, at::tensor({1.0, 2.0, 0.0}, at::kDouble));
  EXPECT(at::allclose(g3[1], 2 * grad[1]) && at::allclose(g3[0], grad[0]) && g3[2].abs().max().item<double>() == 0);

  // 3. Errors are exceptions (never exit), with the op-prefixed message.
  bool threw = false;
  try {
    amid::amid_loss_fwd(s, t, std::nullopt, alpha, 1.5, "kl", "pr", 0.2, 0.7, 1.0, false, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what_without_backtrace()).find("amid::amid_loss_fwd: expected lam in [0, 1], but got 1.5") != std::string::npos;
  }
  EXPECT(threw);

  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
